"""`heads evaluate`'s scoring: each labelled clip's scores over the labels the data maps to,
from a custom head or the checkpoint's own nine-class head (`builtin`), either in this process
(EmotionEngine from the config, files decoded by the batch job's decode stage: as the
service decodes) or through a running service (POST /v1/predict with `head=` and `labels=`).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from serve_app.heads.data import Clip

BUILTIN = "builtin"
SAMPLE_RATE = 16_000
DECODE_CHUNK = 64  # files decoded at once: their waveforms are held together
BACKOFF_S, MAX_BACKOFF_S, CONCURRENCY = 0.5, 30.0, 4


class ScoringError(ValueError):
    """The scorer cannot be set up: unknown head, a label it lacks (exit status 2)."""


def parse_label_map(text: str | None) -> dict[str, str]:
    """'frustrated=angry,calm=neutral' -> {data label: scorer label}."""
    found: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        source, sep, target = item.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise ScoringError(f"--label-map: {item.strip()!r} is not DATA_LABEL=MODEL_LABEL")
        found[source.strip()] = target.strip()
    return found


def targets(data_labels: list[str], scorer_labels: list[str],
            label_map: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(data label -> scorer label, the scorer labels scored, in the scorer's order); a data
    label that maps to no label of the scorer is refused."""
    mapping = {label: label_map.get(label, label) for label in data_labels}
    unknown = sorted(label for label, target in mapping.items() if target not in scorer_labels)
    if unknown:
        raise ScoringError(f"labels {unknown[:8]} are not among the scorer's {scorer_labels}: "
                           "give --label-map DATA_LABEL=MODEL_LABEL,...")
    wanted = set(mapping.values())
    if len(wanted) < 2:
        raise ScoringError("the data's labels map to fewer than 2 of the scorer's labels")
    return mapping, [label for label in scorer_labels if label in wanted]


@dataclass
class LocalScorer:
    """An engine of the config's variant, with a head or its own."""

    plan: object
    head: object | None  # headfile.Head; None: builtin

    def __post_init__(self):
        from serve_app.inference.engine import EmotionEngine
        from serve_app.tools.batch.stages import default_threads

        model = self.plan.model
        self.engine = EmotionEngine(model, "cpu", model.threads
                                    or default_threads(os.cpu_count() or 1))
        info = self.engine.load()
        if self.head is not None:
            self.engine.check_head(self.head)
        self.labels = list(self.head.labels) if self.head is not None else list(info.labels)

    def score(self, clips: list[Clip], scored: list[str]) -> list[dict[str, float] | str]:
        """Each clip's scores by label (a softmax over `scored`), or why it failed."""
        import numpy as np
        import pyarrow as pa

        from serve_app.labels import english_name
        from serve_app.tools.batch.stages import decode_files

        outcomes: list[dict[str, float] | str] = []
        for start in range(0, len(clips), DECODE_CHUNK):
            chunk = clips[start:start + DECODE_CHUNK]
            paths = sorted({clip.path for clip in chunk})
            items = decode_files(pa.table({"path": paths}), self.plan).to_pylist()
            decoded = {item["path"]: item for item in items}
            for clip in chunk:
                item = decoded[clip.path]
                if item["waveform"] is None:
                    outcomes.append(f"{item['error_code']}: {item['error']}")
                    continue
                waveform = np.frombuffer(item["waveform"], dtype=np.float32).copy()
                if clip.start_s is not None:
                    waveform = waveform[round(clip.start_s * SAMPLE_RATE):
                                        round(clip.end_s * SAMPLE_RATE)]
                try:
                    found = self.engine.predict(waveform, "utterance", False, scored, self.head)
                except Exception as exc:  # a clip the model cannot take fails alone
                    outcomes.append(f"model_error: {exc}")
                    continue
                names = found.labels if self.head is not None else [
                    english_name(label) for label in found.labels]
                outcomes.append(dict(zip(names, found.scores)))
        return outcomes


def remote_labels(url: str, head: str | None, model_version: str | None,
                  api_key: str | None, timeout_s: float) -> list[str]:
    """The labels the service scores with: the head's (GET /v1/heads/HEAD), or, for the
    checkpoint's own head, those GET /v1/models gives for the variant that `model_version`
    (a variant or an alias; default: the service's default version) routes to."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    asked = f"head {head}'s labels" if head else "the variants' labels"
    try:
        with httpx.Client(base_url=url, timeout=timeout_s, headers=headers) as client:
            response = client.get(f"/v1/heads/{head}" if head else "/v1/models")
            response.raise_for_status()
            answer = response.json()
            if head:
                return list(answer["labels"])
            return _variant_labels(answer, model_version)
    except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
        raise ScoringError(f"cannot ask {url} for {asked}: {exc}") from None


def _variant_labels(models: dict, model_version: str | None) -> list[str]:
    """A GET /v1/models answer -> the labels of the variants `model_version` routes to (an
    alias split between variants: they must agree)."""
    name = model_version or models["default_version"]
    target = models.get("aliases", {}).get(name, name)
    names = [target] if isinstance(target, str) else [
        variant for variant, weight in target.items() if weight > 0]
    variants = models["variants"]
    unknown = [variant for variant in names if variant not in variants]
    if unknown:
        raise ScoringError(f"the service has no variant {unknown[0]!r} (model version "
                           f"{name!r}); variants: {sorted(variants)}")
    found = {variant: variants[variant].get("labels") for variant in names}
    loading = [variant for variant, labels in found.items() if not labels]
    if loading:
        raise ScoringError(f"variant {loading[0]} names no labels yet (state "
                           f"{variants[loading[0]].get('state')}): try again when it is ready")
    if len({tuple(labels) for labels in found.values()}) > 1:
        raise ScoringError(f"model version {name!r} routes to variants with different labels: "
                           f"{found}; name one variant")
    return list(next(iter(found.values())))


def score_remote(clips: list[Clip], scored: list[str], url: str, head: str | None,
                 model_version: str | None, api_key: str | None, tries: int,
                 timeout_s: float) -> list[dict[str, float] | str]:
    """Each clip sent to POST /v1/predict (with retries, as `predict` sends them)."""
    import httpx

    from serve_app.tools.client import post_with_retries

    if any(clip.start_s is not None for clip in clips):
        raise ScoringError("segments (start_s, end_s) are scored with --local only")
    fields = {"labels": ",".join(scored), **({"head": head} if head else {}),
              **({"model_version": model_version} if model_version else {})}

    async def run() -> list[dict[str, float] | str]:
        limit = asyncio.Semaphore(CONCURRENCY)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s, headers=headers) as client:
            async def one(clip: Clip) -> dict[str, float] | str:
                try:
                    data = Path(clip.path).read_bytes()
                except OSError as exc:
                    return f"unreadable: {exc.strerror or exc}"
                async with limit:
                    sent = await post_with_retries(client, "/v1/predict",
                                                   {"file": (Path(clip.path).name, data)},
                                                   fields, tries, BACKOFF_S, MAX_BACKOFF_S)
                return sent.error if sent.error else dict(sent.response.json()["scores"])

            return list(await asyncio.gather(*(one(clip) for clip in clips)))

    return asyncio.run(run())
