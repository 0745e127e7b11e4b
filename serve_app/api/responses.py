"""What a variant answered, shaped into the API's JSON (one shape for all variants), and
results saved to disk. No torch, no Ray: the router and the stream both use it."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path, PurePath

import numpy as np

from serve_app.labels import emotion_fields
from serve_app.wire import Granularity, TimelineWindow, VariantAnswer

# An absolute, home or ./ path in a text (not a hub id like iic/emotion2vec_plus_large, nor a URL).
_LOCAL_PATH = re.compile(r"(?<![\w.:/~-])(?:~|\.{1,2})?/[^\s'\"`,;:()\[\]{}<>]+")


def _last_part(path: str) -> str:
    """A directory by its name; a file (it has a suffix) by its directory's name and its own,
    so that `.../large-ft/model.pt` still says which model's file it is."""
    pure = PurePath(path)
    if pure.suffix and pure.parent.name:
        return f"{pure.parent.name}/{pure.name}"
    return pure.name or "/"


def without_paths(value):
    """`value` (dicts, lists, strings) with every local path cut to its last part: a model
    directory shows as its name. Clients see which model, never where it lives on the server."""
    if isinstance(value, str):
        return _LOCAL_PATH.sub(lambda match: _last_part(match.group()), value)
    if isinstance(value, dict):
        return {key: without_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_paths(item) for item in value]
    return value


def timeline_window(labels: list[str], window: TimelineWindow) -> dict:
    """One timeline window in the response's shape: times, emotion, scores by English name."""
    fields = emotion_fields(labels, window.scores)
    del fields["label"]
    return {"start_s": window.start_s, "end_s": window.end_s, **fields}


def audio_fields(duration_s: float, sample_rate: int, channels: int, fmt: str) -> dict:
    return {"duration_s": round(duration_s, 4), "sample_rate": sample_rate,
            "channels": channels, "format": fmt}


def prediction(answer: VariantAnswer, *, request_id: str, variant: str,
               granularity: Granularity, audio: dict, extract_embedding: bool,
               routed_by: str | None = None) -> dict:
    """The response body of a prediction (timings are added by the caller). routed_by: the
    weighted alias that chose the variant (None for a variant or plain alias)."""
    result = {
        "request_id": request_id,
        "model_version": variant,
        "routed_by": routed_by,
        "head": answer.head,  # the custom head that scored it; None: the checkpoint's own
        **emotion_fields(answer.labels, answer.scores),
        "granularity": str(granularity),
        "audio": audio,
        "model": without_paths(asdict(answer.model)),
    }
    if answer.timeline is not None:
        result["timeline"] = [timeline_window(answer.labels, window)
                              for window in answer.timeline]
    if extract_embedding:
        result["embedding"] = answer.embedding.tolist()
    return result


SAVE_TRIES = 100  # request_id, request_id.2, ... request_id.100, then a random suffix


def save_result(output_dir: str, request_id: str, result: dict,
                embedding: np.ndarray | None) -> Path:
    """Write result.json (and embedding.npy) under output_dir/request_id, all or nothing; a
    request id seen before (a client's retry, a replay) gets request_id.2, .3, ... Returns the
    folder written."""
    root = Path(output_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{request_id}.", dir=root))
    try:
        (staging / "result.json").write_text(json.dumps(result))
        if embedding is not None:
            np.save(staging / "embedding.npy", embedding)
        names = [request_id] + [f"{request_id}.{n}" for n in range(2, SAVE_TRIES + 1)]
        for name in [*names, f"{request_id}.{uuid.uuid4().hex}"]:
            try:
                # A folder cannot be renamed onto a non-empty one: the first free name wins,
                # atomically, even against a concurrent request with the same id.
                os.rename(staging, root / name)
                return root / name
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        raise FileExistsError(f"no free name for {request_id} under {root}")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
