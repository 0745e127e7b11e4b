"""The batch job's two stages, run by Ray Data on the cluster's workers:

- `decode_files` (CPU tasks): each file read and decoded as the Router decodes an upload (the
  service's decoders, limits and error codes), into an *item*: a path with its 16 kHz waveform,
  or with the error that stopped it;
- `EngineStage` (an actor pool): each actor loads the variant's engine once and scores the
  items it is handed, grouped by length into padded passes (serve_app/inference/passes.py), as
  the variant deployment does; every item becomes one result row, error items included.

Items are one per file. With --by-segment an item also carries its recording's segments
(serve_app/tools/batch/recordings.py), the engine scores each segment's samples as one clip, and
a file gives one row per segment; all of a file's rows leave the engine in one table, so that
a part never holds half a recording (serve_app/tools/batch/parts.py).
"""

from __future__ import annotations

import asyncio
import math
import os

import numpy as np
import pyarrow as pa

from serve_app.api.responses import audio_fields
from serve_app.audio.pool import Decoder
from serve_app.audio.waveform import upload_too_large
from serve_app.errors import ApiError
from serve_app.jobs.inputs import read_source, source_size
from serve_app.labels import emotion_fields, english_name, select
from serve_app.tools.batch.plan import JobPlan
from serve_app.tools.batch.recordings import SegmentFinder

SPAN = pa.struct([("start", pa.int64()), ("end", pa.int64()), ("start_s", pa.float64()),
                  ("end_s", pa.float64()), ("speaker", pa.string())])
# What the decode stage hands the engine stage, one row per item (waveform: float32 bytes;
# spans: the segments with --by-segment, else null).
ITEM_SCHEMA = pa.schema([("path", pa.string()), ("error_code", pa.string()),
                         ("error", pa.string()), ("duration_s", pa.float64()),
                         ("spans", pa.list_(SPAN)), ("waveform", pa.large_binary())])
ITEM_FIELDS = ITEM_SCHEMA.names[:4]  # what a result row takes from its item
# --by-segment's columns: the file's segment count (0: no speech found; null: the file
# failed), this row's segment (from 0, start order), its times and speaker, as
# POST /v1/segments gives them.
SEGMENT_FIELDS = [("segments", pa.int32()), ("segment", pa.int32()), ("start_s", pa.float64()),
                  ("end_s", pa.float64()), ("speaker", pa.string())]


def result_schema(emotions: list[str], embeddings: bool, by_segment: bool = False) -> pa.Schema:
    """One row per file, or per segment (see docs/batch.md); one score column per label, in
    head order."""
    fields = [("path", pa.string()), ("status", pa.string()), ("error_code", pa.string()),
              ("error", pa.string()), ("duration_s", pa.float64()),
              *(SEGMENT_FIELDS if by_segment else []), ("emotion", pa.string()),
              ("confidence", pa.float64()),
              *[(f"score_{name}", pa.float64()) for name in emotions],
              ("model_version", pa.string()), ("model_source", pa.string()),
              ("model_sha256", pa.string()), ("weights", pa.string()), ("node_id", pa.string()),
              ("head", pa.string())]  # the custom head, NAME@REV (null: the model's own)
    if embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    return pa.schema(fields)


# -- decoding ---------------------------------------------------------------------------------
async def _decode_one(decoder: Decoder, path: str, plan: JobPlan,
                      finder: SegmentFinder | None) -> dict:
    item = {"path": path, "error_code": None, "error": None, "duration_s": None,
            "spans": None, "waveform": None}
    # A recording (--by-segment) has the segments route's limits, a clip predict's.
    max_bytes = plan.segments.max_recording_bytes if finder else plan.max_upload_bytes
    try:
        if source_size(path) > max_bytes:
            raise upload_too_large(max_bytes)  # never read into memory
        data = await asyncio.to_thread(read_source, path)
        decoded = await decoder.decode(data, plan.recording_limits if finder else plan.limits)
        if finder:
            spans = await asyncio.to_thread(finder.spans, path, decoded.waveform)
            item["spans"] = [{"start": span.start, "end": span.end, "start_s": span.start_s,
                              "end_s": span.end_s, "speaker": span.speaker} for span in spans]
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


async def _decode_all(paths: list[str], plan: JobPlan, by_segment: bool) -> list[dict]:
    decoder = Decoder(plan.decode_workers)
    finder = SegmentFinder(plan) if by_segment else None
    try:
        return [await _decode_one(decoder, path, plan, finder) for path in paths]
    finally:
        await decoder.close()


def decode_files(batch: pa.Table, plan: JobPlan, by_segment: bool = False) -> pa.Table:
    """Ray Data task: a table of `path`s -> one item per file (ITEM_SCHEMA)."""
    items = asyncio.run(_decode_all(batch.column("path").to_pylist(), plan, by_segment))
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

    def __init__(self, plan: JobPlan, embeddings: bool, num_cpus: float,
                 by_segment: bool = False):
        import ray
        import torch

        from serve_app.inference.engine import EmotionEngine

        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave this actor (none: the CPU).
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.plan, self.embeddings, self.by_segment = plan, embeddings, by_segment
        self.engine = EmotionEngine(plan.model, device,
                                    plan.model.threads or default_threads(num_cpus))
        info = self.engine.load()
        self.engine.warmup()
        self.head = plan.head
        if self.head is not None:
            self.engine.check_head(self.head)  # trained on this checkpoint, or no job
        labels = self.engine.labels if self.head is None else self.head.labels
        # A label set (a job's `labels`) keeps its columns only, in head order.
        keep = range(len(labels)) if plan.labels is None else select(plan.labels, labels)
        self.emotions = [english_name(labels[i]) for i in keep]
        self.schema = result_schema(self.emotions, embeddings, by_segment)
        self.model = {"model_version": plan.variant, "model_source": info.source,
                      "model_sha256": info.sha256, "weights": info.weights,
                      "node_id": ray.get_runtime_context().get_node_id(),
                      "head": None if self.head is None else
                      f"{self.head.name}@{self.head.revision}"}

    def __call__(self, items: pa.Table) -> pa.Table:
        """Items in, rows out, in item order (a file's segment rows together)."""
        entries = [{name: items.column(name)[i].as_py() for name in ITEM_FIELDS}
                   for i in range(items.num_rows)]
        # The clips to score: (entry, samples) for each file's waveform, or for each of its
        # segments (--by-segment).
        clips: list[tuple[int, np.ndarray]] = []
        for i, value in enumerate(items.column("waveform")):
            if not value.is_valid:
                continue
            waveform = np.frombuffer(value.as_buffer(), dtype=np.float32)
            spans = items.column("spans")[i].as_py()
            entries[i].update(spans=spans, outcomes=[])
            pieces = [waveform] if spans is None else [waveform[s["start"]:s["end"]]
                                                        for s in spans]
            clips.extend((i, piece) for piece in pieces)
        outcomes: list[dict] = [{}] * len(clips)
        for chunk in passes([len(clip) for _, clip in clips], self.plan):
            for position, outcome in zip(chunk, self._score([clips[p][1] for p in chunk])):
                outcomes[position] = outcome
        for (i, _), outcome in zip(clips, outcomes):
            entries[i]["outcomes"].append(outcome)
        rows = [row for entry in entries for row in self._rows(entry)]
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _rows(self, entry: dict) -> list[dict]:
        """A file's rows: one, or one per segment (--by-segment)."""
        item = {name: entry[name] for name in ITEM_FIELDS}
        outcomes, spans = entry.get("outcomes", []), entry.get("spans")
        if not self.by_segment:
            return [self._row({**item, **(outcomes[0] if outcomes else {})})]
        if spans is None:  # the file failed before it had segments
            return [self._row(item)]
        if not spans:  # no speech: one row that says so (no emotion)
            return [{**self._row(item), "status": "ok", "segments": 0}]
        return [{**self._row({**item, **outcome}), "segments": len(spans), "segment": index,
                 "start_s": span["start_s"], "end_s": span["end_s"],
                 "speaker": span["speaker"]}
                for index, (span, outcome) in enumerate(zip(spans, outcomes))]

    def _score(self, waveforms: list[np.ndarray]) -> list[dict]:
        """Each clip's outcome; a pass that fails is run again clip by clip, so that a clip
        the model cannot take fails alone."""
        engine = self.engine
        try:
            if self.plan.model.max_batch_size == 1:
                predictions = [engine.predict(waveforms[0], "utterance", self.embeddings,
                                              self.plan.labels, self.head)]
            else:
                predictions = engine.predict_batch(waveforms, "utterance", self.embeddings,
                                                   [self.plan.labels] * len(waveforms),
                                                   [self.head] * len(waveforms))
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
