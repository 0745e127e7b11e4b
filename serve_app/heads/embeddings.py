"""Utterance embeddings of labelled clips, as the service computes them, and their cache.

The clips the cache lacks are scored by the batch job (serve_app/tools/batch): its Ray Data
stages decode each file as the Router decodes an upload and run the variant's engine with
embeddings on, into a temporary folder whose rows are then read. Segments of longer recordings
(start_s, end_s) go through the job's `--by-segment` path: each recording is linked into the
temporary folder with an RTTM file beside it naming its segments, so they are cut and scored
as POST /v1/segments scores given segments.

Cache: one float32 .npy per (checkpoint sha256, precision, file sha256, segment) under
`--cache-dir` (default $EMOTION2VEC_EMBEDDINGS_CACHE, else ~/.cache/emotion2vec-serve/
embeddings). A file is known by its bytes, not its path: a renamed or copied clip is a hit, an
edited one a miss. Each entry is written under a temporary name and moved in place.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve_app.checkpoints.weights import file_sha256
from serve_app.heads.data import Clip

CACHE_ENV = "EMOTION2VEC_EMBEDDINGS_CACHE"
DEFAULT_CACHE = "~/.cache/emotion2vec-serve/embeddings"
CHECKPOINT_SUMS = "checkpoints.json"  # model.pt sha256 by (path, size, mtime): hashed once


class ExtractionError(RuntimeError):
    """The embeddings could not be computed at all (exit status 2)."""


def cache_root(given: str | None) -> Path:
    return Path(given or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _checkpoint_sha256(weights: Path, root: Path) -> str:
    """model.pt's sha256, remembered by path, size and mtime (large's is 1.95 GB)."""
    stat = weights.stat()
    key = f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    sums_file = root / CHECKPOINT_SUMS
    try:
        sums = json.loads(sums_file.read_text())
    except (OSError, ValueError):
        sums = {}
    if key not in sums:
        sums[key] = file_sha256(weights)
        root.mkdir(parents=True, exist_ok=True)
        _write_atomically(sums_file, json.dumps(sums, indent=1).encode())
    return sums[key]


def backbone(plan, root: Path) -> dict:
    """The checkpoint a job plan's variant loads: arch, sha256 of model.pt, where from (the
    embedding dimension is added once an embedding is known)."""
    from serve_app.checkpoints.generate import random_weights_info
    from serve_app.inference.engine import EmotionEngine

    weights = EmotionEngine(plan.model, "cpu", 1).checkpoint_file()
    generated = random_weights_info(weights.parent) or {}
    return {"arch": generated.get("arch") or Path(str(plan.model.source)).name,
            "sha256": _checkpoint_sha256(weights, root), "variant": plan.variant,
            "source": str(plan.model.source), "precision": plan.model.precision}


def _write_atomically(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    staging.write_bytes(data)
    os.replace(staging, path)


class EmbeddingCache:
    """Embeddings of one checkpoint in one precision (turbo computes large's in reduced
    precision: its embeddings differ slightly)."""

    def __init__(self, root: Path, checkpoint_sha256: str, precision: str):
        self.folder = root / checkpoint_sha256 / precision

    def _path(self, key: tuple) -> Path:
        sha256, start_s, end_s = key
        segment = "" if start_s is None else f"@{start_s:.6f}-{end_s:.6f}"
        return self.folder / sha256[:2] / f"{sha256}{segment}.npy"

    def get(self, key: tuple) -> np.ndarray | None:
        try:
            return np.load(self._path(key), allow_pickle=False)
        except (OSError, ValueError):
            return None

    def put(self, key: tuple, embedding: np.ndarray) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.npy")
        np.save(staging, np.asarray(embedding, dtype=np.float32), allow_pickle=False)
        os.replace(staging, path)


@dataclass
class Extraction:
    embeddings: list[np.ndarray | None]  # per clip, in order; None where it failed
    errors: list[str | None]             # per clip: why it failed
    hits: int = 0                        # clips found in the cache
    extracted: int = 0                   # clips the batch job scored (its misses)
    seconds: float = 0.0
    backbone: dict = field(default_factory=dict)
    keys: list[str | None] = field(default_factory=list)  # per clip: its file's sha256


def _key(clip: Clip, sha256: str) -> tuple:
    return (sha256, clip.start_s, clip.end_s)


def extract(clips: list[Clip], plan, root: Path, address: str | None,
            num_cpus: float | None) -> Extraction:
    """Every clip's embedding, from the cache or the batch job (`plan`: its variant and
    limits); a clip that cannot be read or decoded gets its reason instead."""
    started = time.monotonic()
    found = Extraction([None] * len(clips), [None] * len(clips), backbone=backbone(plan, root))
    cache = EmbeddingCache(root, found.backbone["sha256"], plan.model.precision)
    keys: list[tuple | None] = []
    for index, clip in enumerate(clips):
        try:
            keys.append(_key(clip, file_sha256(clip.path)))
        except OSError as exc:
            keys.append(None)
            found.errors[index] = f"unreadable: {exc.strerror or exc}"
    missing: dict[tuple, Clip] = {}
    for index, (clip, key) in enumerate(zip(clips, keys)):
        if key is None:
            continue
        cached = cache.get(key)
        if cached is not None:
            found.embeddings[index] = cached
            found.hits += 1
        else:
            missing.setdefault(key, clip)
    if missing:
        scored = _score(missing, plan, address, num_cpus, found.backbone["sha256"])
        for key, outcome in scored.items():
            if isinstance(outcome, np.ndarray):
                cache.put(key, outcome)
        for index, key in enumerate(keys):
            if key in scored:
                outcome = scored[key]
                if isinstance(outcome, np.ndarray):
                    found.embeddings[index] = outcome
                    found.extracted += 1
                else:
                    found.errors[index] = outcome
    found.keys = [key[0] if key else None for key in keys]
    dims = {len(e) for e in found.embeddings if e is not None}
    if len(dims) > 1:
        raise ExtractionError(f"embeddings of several lengths {sorted(dims)}: clear "
                              f"{cache.folder}")
    found.backbone["embedding_dim"] = dims.pop() if dims else 0
    found.seconds = time.monotonic() - started
    return found


def _score(missing: dict[tuple, Clip], plan, address: str | None,
           num_cpus: float | None, checkpoint_sha256: str) -> dict[tuple, np.ndarray | str]:
    """The batch job over the missing clips: key -> embedding, or the row's error."""
    import ray

    from serve_app.tools.batch.resources import NoRoom, check_room, connect

    whole = {key: clip for key, clip in missing.items() if clip.start_s is None}
    segments = {key: clip for key, clip in missing.items() if clip.start_s is not None}
    joined = not ray.is_initialized()  # a caller's own connection is left as it is
    if joined:
        try:
            print(connect(address), file=sys.stderr)
        except Exception as exc:  # ray.init raises many kinds
            raise ExtractionError(f"cannot join the Ray cluster: {exc}") from None
    try:
        with tempfile.TemporaryDirectory(prefix="heads-") as work:
            args = _job_args(work, num_cpus)
            try:
                check_room([{"CPU": args.num_cpus}, {"CPU": args.decode_cpus}],
                           args.placement_timeout_s)
            except NoRoom as exc:
                raise ExtractionError(str(exc)) from None
            outcomes: dict[tuple, np.ndarray | str] = {}
            if whole:
                named = {clip.path: key for key, clip in whole.items()}
                rows = _run(plan, named, work, "files", args, False)
                outcomes.update(_outcomes(rows, lambda row: [row["path"]], checkpoint_sha256,
                                          named))
            if segments:
                named = _link_recordings(segments, Path(work) / "recordings")
                rows = _run(plan, named, work, "segments", args, True)
                outcomes.update(_outcomes(
                    rows, lambda row: [f"{row['path']}#{row['speaker']}"] if row["speaker"]
                    else [name for name in named if name.startswith(row["path"] + "#")],
                    checkpoint_sha256, named))
            return outcomes
    finally:
        if joined:
            ray.shutdown()  # stops a local cluster started for this run


def _job_args(work: str, num_cpus: float | None):
    """The batch job's flags: its own defaults (kept in one place, its parser) but these."""
    import argparse

    from serve_app.tools.batch import job

    parser = argparse.ArgumentParser()
    job.add_parser(parser.add_subparsers())
    given = ["--num-cpus", str(num_cpus)] if num_cpus is not None else []
    return parser.parse_args(["batch", work, "--out", work, "--embeddings", "--no-progress",
                              *given])


def _run(plan, named: dict[str, tuple], work: str, name: str, args, by_segment: bool):
    import pyarrow as pa

    from serve_app.tools.batch import job
    from serve_app.tools.batch.parts import read_rows

    out = Path(work) / name
    out.mkdir()
    args.by_segment = by_segment
    paths = sorted({entry.split("#", 1)[0] for entry in named})
    if job.run(plan, pa.array(paths, pa.string()), out, args, 0) == 2:
        raise ExtractionError("the embedding job stopped (its reason is above)")
    return read_rows(out).to_pylist()


def _link_recordings(segments: dict[tuple, Clip], folder: Path) -> dict[str, tuple]:
    """Each recording linked under `folder` with an RTTM file beside it, one turn per segment
    (speaker s0, s1, ...): '<link>#s<i>' -> the segment's key."""
    folder.mkdir()
    by_file: dict[str, list[tuple]] = {}
    for key, clip in segments.items():
        by_file.setdefault(clip.path, []).append(key)
    named = {}
    for number, (path, keys) in enumerate(sorted(by_file.items())):
        link = folder / f"r{number}.audio"
        link.symlink_to(path)
        lines = []
        for index, key in enumerate(keys):
            _, start_s, end_s = key
            lines.append(f"SPEAKER r{number} 1 {start_s:.6f} {end_s - start_s:.6f} <NA> <NA> "
                         f"s{index} <NA> <NA>")
            named[f"{link}#s{index}"] = key
        link.with_suffix(".rttm").write_text("\n".join(lines) + "\n")
    return named


def _outcomes(rows: list[dict], names, checkpoint_sha256: str,
              named: dict[str, tuple]) -> dict[tuple, np.ndarray | str]:
    """The job's rows -> key -> embedding, or the reason it failed (`names`: the entries
    of `named` a row answers for)."""
    outcomes: dict[tuple, np.ndarray | str] = {}
    for row in rows:
        for name in names(row):
            key = named[name]
            if row["status"] == "ok" and row.get("embedding") is not None:
                if row["model_sha256"] != checkpoint_sha256:
                    raise ExtractionError(f"the job scored with checkpoint "
                                          f"{row['model_sha256'][:12]}, not "
                                          f"{checkpoint_sha256[:12]}: did it change meanwhile?")
                outcomes[key] = np.asarray(row["embedding"], dtype=np.float32)
            else:
                outcomes[key] = f"{row['error_code']}: {row['error']}"
    return outcomes
