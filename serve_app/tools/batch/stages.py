"""The batch job's two stages, run by Ray Data on the cluster's workers:

- `decode_files` (CPU tasks): each file read and decoded as the Router decodes an upload (the
  service's decoders, limits and error codes), into an *item*: a path with its 16 kHz waveform,
  or with the error that stopped it;
- `EngineStage` (an actor pool): each actor loads the variant's engine once and scores the
  items it is handed, grouped by length into padded passes (serve_app/inference/passes.py), as
  the variant deployment does; every item becomes one result row, error items included.

Items are one per file. Scoring segments means one item per segment: the decode stage would
emit several items per file, ITEM_SCHEMA and result_schema would gain the segment's start and
end, and the scoring in between stays as it is.
"""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from serve_app.api.responses import audio_fields, emotion_fields
from serve_app.audio.pool import Decoder
from serve_app.audio.waveform import upload_too_large
from serve_app.errors import ApiError
from serve_app.labels import english_name
from serve_app.tools.batch.plan import JobPlan

# What the decode stage hands the engine stage, one row per item (waveform: float32 bytes).
ITEM_SCHEMA = pa.schema([("path", pa.string()), ("error_code", pa.string()),
                         ("error", pa.string()), ("duration_s", pa.float64()),
                         ("waveform", pa.large_binary())])


def result_schema(emotions: list[str], embeddings: bool) -> pa.Schema:
    """One row per file (see docs/batch.md); one score column per label, in head order."""
    fields = [("path", pa.string()), ("status", pa.string()), ("error_code", pa.string()),
              ("error", pa.string()), ("duration_s", pa.float64()), ("emotion", pa.string()),
              ("confidence", pa.float64()),
              *[(f"score_{name}", pa.float64()) for name in emotions],
              ("model_version", pa.string()), ("model_source", pa.string()),
              ("model_sha256", pa.string()), ("weights", pa.string()), ("node_id", pa.string())]
    if embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    return pa.schema(fields)


# -- decoding ---------------------------------------------------------------------------------
async def _decode_one(decoder: Decoder, path: str, plan: JobPlan) -> dict:
    item = {"path": path, "error_code": None, "error": None, "duration_s": None,
            "waveform": None}
    try:
        if os.stat(path).st_size > plan.max_upload_bytes:
            raise upload_too_large(plan.max_upload_bytes)  # never read into memory
        data = await asyncio.to_thread(Path(path).read_bytes)
        decoded = await decoder.decode(data, plan.limits)
    except ApiError as exc:
        item.update(error_code=exc.code, error=exc.message)
    except OSError as exc:
        item.update(error_code="unreadable", error=f"cannot read the file: {exc.strerror or exc}")
    except Exception as exc:  # a bad file is an error row, never a failed job
        item.update(error_code="decode_error", error=f"{type(exc).__name__}: {exc}")
    else:
        fields = audio_fields(decoded.duration_s, decoded.sample_rate, decoded.channels,
                              decoded.format)
        item.update(duration_s=fields["duration_s"], waveform=decoded.waveform.tobytes())
    return item


async def _decode_all(paths: list[str], plan: JobPlan) -> list[dict]:
    decoder = Decoder(plan.decode_workers)
    try:
        return [await _decode_one(decoder, path, plan) for path in paths]
    finally:
        await decoder.close()


def decode_files(batch: pa.Table, plan: JobPlan) -> pa.Table:
    """Ray Data task: a table of `path`s -> one item per file (ITEM_SCHEMA)."""
    items = asyncio.run(_decode_all(batch.column("path").to_pylist(), plan))
    return pa.Table.from_pylist(items, schema=ITEM_SCHEMA)


# -- scoring ----------------------------------------------------------------------------------
def passes(lengths: list[int], plan: JobPlan) -> list[list[int]]:
    """The forward passes the variant would run: one clip each without batching, else
    padded passes, shortest first, bounded in clips and padded samples."""
    from serve_app.inference.passes import padded_chunks

    if plan.model.max_batch_size == 1:
        return [[i] for i in range(len(lengths))]
    return padded_chunks(lengths, plan.max_padded_samples, plan.model.max_batch_size)


def default_threads(num_cpus: float) -> int:
    """Torch threads for an engine: its CPU share rounded up, at most the node's cores."""
    return max(1, min(os.cpu_count() or 1, math.ceil(num_cpus)))


class EngineStage:
    """Ray Data actor: one EmotionEngine for the job's variant, loaded once."""

    def __init__(self, plan: JobPlan, embeddings: bool, num_cpus: float):
        import ray
        import torch

        from serve_app.inference.engine import EmotionEngine

        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave this actor (none: the CPU).
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.plan, self.embeddings = plan, embeddings
        self.engine = EmotionEngine(plan.model, device,
                                    plan.model.threads or default_threads(num_cpus))
        info = self.engine.load()
        self.engine.warmup()
        self.emotions = [english_name(label) for label in self.engine.labels]
        self.schema = result_schema(self.emotions, embeddings)
        self.model = {"model_version": plan.variant, "model_source": info.source,
                      "model_sha256": info.sha256, "weights": info.weights,
                      "node_id": ray.get_runtime_context().get_node_id()}

    def __call__(self, items: pa.Table) -> pa.Table:
        rows = [{name: items.column(name)[i].as_py() for name in ITEM_SCHEMA.names[:-1]}
                for i in range(items.num_rows)]
        waveforms = {i: np.frombuffer(value.as_buffer(), dtype=np.float32)
                     for i, value in enumerate(items.column("waveform")) if value.is_valid}
        indices = list(waveforms)
        for chunk in passes([len(waveforms[i]) for i in indices], self.plan):
            members = [indices[position] for position in chunk]
            for index, outcome in zip(members, self._score([waveforms[i] for i in members])):
                rows[index].update(outcome)
        return pa.Table.from_pylist([self._row(row) for row in rows], schema=self.schema)

    def _score(self, waveforms: list[np.ndarray]) -> list[dict]:
        """Each clip's outcome; a pass that fails is run again clip by clip, so that a clip
        the model cannot take fails alone."""
        engine = self.engine
        try:
            if self.plan.model.max_batch_size == 1:
                predictions = [engine.predict(waveforms[0], "utterance", self.embeddings)]
            else:
                predictions = engine.predict_batch(waveforms, "utterance", self.embeddings)
        except Exception as exc:
            if len(waveforms) == 1:
                return [{"error_code": "model_error",
                         "error": f"variant {self.plan.variant} failed on this file: {exc}"}]
            return [outcome for waveform in waveforms for outcome in self._score([waveform])]
        return [{"prediction": prediction} for prediction in predictions]

    def _row(self, item: dict) -> dict:
        row = {"path": item["path"], "error_code": item["error_code"], "error": item["error"],
               "duration_s": item["duration_s"], **self.model}
        prediction = item.get("prediction")
        if prediction is None:
            row["status"] = "failed"
            return row
        fields = emotion_fields(prediction.labels, prediction.scores)
        row.update(status="ok", emotion=fields["emotion"], confidence=fields["confidence"],
                   **{f"score_{name}": score for name, score in fields["scores"].items()})
        if self.embeddings:
            row["embedding"] = prediction.embedding
        return row
