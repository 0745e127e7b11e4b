"""POST /v1/segments: a whole recording, scored utterance by utterance, as a thin adapter over
the request pipeline (serve_app/api/pipeline.py): the same admission (the recording's
duration is charged), routing, decoding (with the route's own limits), variant calls (each
segment is a predict of its samples, with the router's model timeout), errors, shadow, access
log and metrics as predict.

The steps: read the request (serve_app/api/upload.py, this route's UploadSpec: a recording up
to max_recording_bytes, an RTTM file, and a segments field far larger than predict's 64 KB
fields: 2,000 segments are ~140 KB of JSON); check given segments before decoding
(serve_app/segments/spec.py); decode, keeping the channels apart for channels=split; check the
given segments against the audio, or find the speech with the VAD deployment
(serve_app/api/vad_client.py); score the segments, at most segments_in_flight at once
(serve_app/segments/runner.py); answer as JSON, or as NDJSON lines as segments finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve_app.api import protocol, upload
from serve_app.api import responses as results
from serve_app.api.app import Parts
from serve_app.api.pipeline import Call, Pipeline
from serve_app.api.vad_client import SpeechFinder
from serve_app.audio.waveform import DecodedAudio
from serve_app.config import RouterSettings, SegmentSettings
from serve_app.errors import ApiError
from serve_app.labels import parse_label_set
from serve_app.metrics import SegmentMetrics
from serve_app.segments.runner import RecordingSlots, score_all
from serve_app.segments.spec import (
    InvalidSegments,
    SegmentSpec,
    Span,
    check_coverage,
    in_order,
    parse_json,
    parse_rttm,
    scored_seconds,
    to_spans,
    too_many_found,
)
from serve_app.segments.summary import SpeakerTally, segment_row
from serve_app.traffic.routing import Route
from serve_app.wire import InferenceOptions, VariantAnswer

logger = logging.getLogger("ray.serve")
NDJSON = "application/x-ndjson"
CHANNELS = ("mix", "split")
BYTES_PER_SEGMENT = 256  # generous for a JSON object or an RTTM line
MIN_SEGMENTS_BYTES = 1024 * 1024
# A segment the variant refuses as overloaded is tried again, this many times in all.
OVERLOADED_TRIES = 4
OVERLOADED_WAIT_S = 1.0


@dataclass
class Job:
    """A recording ready to score."""

    route: Route
    options: InferenceOptions
    audio: DecodedAudio
    waves: list[np.ndarray]  # the 16 kHz waveform, or one per channel (channels=split)
    spans: list[Span]
    segmentation: str        # "vad" or "given"
    vad_ms: float = 0.0

    def samples(self, span: Span) -> np.ndarray:
        return self.waves[span.channel or 0][span.start:span.end]


class SegmentsRoute:
    def __init__(self, pipeline: Pipeline, vad,
                 metrics: SegmentMetrics):
        self.pipeline = pipeline
        self.metrics = metrics
        self.finder = SpeechFinder(vad, metrics)
        self.slots = RecordingSlots(metrics.set_active)

    async def handle(self, request: Request) -> Response:
        """POST /v1/segments."""
        async with contextlib.AsyncExitStack() as stack:
            call = await stack.enter_async_context(self.pipeline.request(request))
            call.trace["kind"] = "segments"
            stack.enter_context(self.slots.hold(call.settings.segments.max_concurrent_recordings))
            job = await self._prepare(call, request)
            if NDJSON in request.headers.get("accept", ""):
                lines = self._lines(stack.pop_all(), call, job)
                return call.respond(StreamingResponse(lines, media_type=NDJSON))
            answer = await self._run(call, job)
            await call.save(answer, None)
            return call.respond(JSONResponse(answer))

    # -- before any model call ----------------------------------------------------------
    async def _prepare(self, call: Call, request: Request) -> Job:
        settings: RouterSettings = call.settings
        limits: SegmentSettings = settings.segments
        sent = await upload.read_upload(request, SEGMENTS, limits.max_recording_bytes,
                                        segments_bytes_limit(limits.max_segments))
        route = call.resolve(sent.params.get("model_version"))
        options = InferenceOptions(
            extract_embedding=upload.parse_bool("extract_embedding",
                                                sent.params.get("extract_embedding")),
            labels=parse_label_set(sent.params.get("labels")))  # a label set for every segment
        # One head revision for the whole recording (a head canary picks once per request).
        options = await call.choose_head(options, sent.params.get("head"))
        channels = sent.params.get("channels", "mix")
        if channels not in CHANNELS:
            raise ApiError(422, "invalid_parameter", f"channels must be one of "
                           f"{list(CHANNELS)}, not {channels[:40]!r}")
        split = channels == "split"
        specs = _given_segments(sent, limits.max_segments, settings.min_duration_s)
        audio = await call.decode(sent.data, limits.decode_limits(settings.decode_limits(),
                                                                  split))
        waves = [audio.waveform]
        if split:
            if audio.channels < 2:
                raise ApiError(422, "invalid_parameter", "channels=split scores each channel "
                               "of a recording on its own; this one has 1 channel")
            waves = list(audio.channel_waveforms)
        if specs is not None:
            spans = to_spans(specs, len(waves[0]), settings.min_duration_s,
                             settings.max_duration_s, len(waves) if split else None)
            check_coverage(spans, len(waves[0]), len(waves))
            job = Job(route, options, audio, waves, spans, "given")
        else:
            spans, vad_ms = await self._find_speech(waves, limits, split)
            job = Job(route, options, audio, waves, spans, "vad", vad_ms)
            call.trace["vad_ms"] = round(vad_ms, 1)
        # The quota pays for what is analysed: every channel scored apart (the VAD reads each),
        # and every second of the segments scored (given ones may overlap). Decoding charged
        # the recording's duration once already.
        analysed = max(audio.duration_s * len(waves), scored_seconds(spans))
        call.charge(analysed - audio.duration_s)
        call.trace.update(segmentation=job.segmentation, segments=len(job.spans))
        return job

    async def _find_speech(self, waves: list[np.ndarray], limits: SegmentSettings,
                           split: bool) -> tuple[list[Span], float]:
        found = await asyncio.gather(*(self.finder.find(wave, limits.vad, limits.vad_timeout_s)
                                       for wave in waves))
        spans = [Span.found(start, end, f"ch{channel}" if split else None,
                            channel if split else None)
                 for channel, (found_spans, _) in enumerate(found)
                 for start, end in found_spans]
        if len(spans) > limits.max_segments:
            raise too_many_found(len(spans), limits.max_segments)
        return in_order(spans), sum(vad_ms for _, vad_ms in found)

    # -- scoring ------------------------------------------------------------------------
    async def _scored(self, call: Call, job: Job) -> AsyncIterator[tuple[int, VariantAnswer]]:
        async def score(span: Span) -> VariantAnswer:
            for attempt in range(OVERLOADED_TRIES):
                try:
                    return await call.infer(job.route, job.samples(span), job.options)
                except ApiError as exc:
                    # The variant's queue is full (other traffic): this segment waits its turn
                    # rather than failing the recording, a bounded number of times.
                    if exc.code != "overloaded" or attempt + 1 == OVERLOADED_TRIES:
                        raise
                    await asyncio.sleep(OVERLOADED_WAIT_S * (attempt + 1))
            raise AssertionError("unreachable")

        in_flight = call.settings.segments.segments_in_flight
        async for index, answer in score_all(job.spans, score, in_flight):
            self.metrics.scored(job.route.variant, job.segmentation)
            yield index, answer

    def _row(self, job: Job, index: int, answer: VariantAnswer) -> dict:
        embedding = answer.embedding if job.options.extract_embedding else None
        return segment_row(index, job.spans[index], answer.labels, answer.scores, embedding)

    def _summary(self, call: Call, job: Job, tally: SpeakerTally,
                 model: dict | None) -> dict:
        audio = job.audio
        return {
            "request_id": call.request_id, "model_version": job.route.variant,
            "routed_by": job.route.routed_by,
            "head": job.options.head and job.options.head.answer(),
            "audio": results.audio_fields(audio.duration_s, audio.sample_rate, audio.channels,
                                          audio.format),
            "model": results.without_paths(model or {"variant": job.route.variant}),
            "segmentation": job.segmentation,
            "speakers": tally.summary(),
            "timings_ms": {"decode": round(call.decode_ms, 3), "vad": round(job.vad_ms, 3),
                           "queue_and_inference": round(call.model_ms, 3),
                           "total": round(call.elapsed_ms(), 3)},
        }

    def _finished(self, job: Job, outcome: str) -> None:
        self.metrics.recording(job.route.variant, job.segmentation, outcome,
                               job.audio.duration_s)

    async def _run(self, call: Call, job: Job) -> dict:
        rows: list[dict | None] = [None] * len(job.spans)
        tally, model = SpeakerTally(), None
        try:
            async for index, answer in self._scored(call, job):
                rows[index] = self._row(job, index, answer)
                tally.add(job.spans[index], answer.labels, answer.scores)
                model = model or asdict(answer.model)
        except ApiError as exc:
            self._finished(job, exc.code)
            raise
        self._finished(job, "ok")
        summary = self._summary(call, job, tally, model)
        return {**{k: v for k, v in summary.items() if k != "speakers"}, "segments": rows,
                "speakers": summary["speakers"]}

    async def _lines(self, owned: contextlib.AsyncExitStack, call: Call,
                     job: Job) -> AsyncIterator[bytes]:
        """NDJSON: a line per segment as it finishes, then the summary; an error after the
        200 is an error line (and the access log's status)."""
        async with owned:  # the request's log line and metrics, once the last line is out
            tally, model, started = SpeakerTally(), None, time.perf_counter()
            try:
                async for index, answer in self._scored(call, job):
                    tally.add(job.spans[index], answer.labels, answer.scores)
                    model = model or asdict(answer.model)
                    yield _line({"type": "segment", **self._row(job, index, answer)})
            except ApiError as exc:
                call.status, call.trace["code"] = exc.status, exc.code
                self._finished(job, exc.code)
                yield _line({"type": "error", **results.without_paths(exc.body())})
                return
            self._finished(job, "ok")
            call.trace["stream_ms"] = round((time.perf_counter() - started) * 1000, 1)
            yield _line({"type": "summary", "segments": len(job.spans),
                         **self._summary(call, job, tally, model)})


def _line(item: dict) -> bytes:
    return (json.dumps(item) + "\n").encode()


def segments_bytes_limit(max_segments: int) -> int:
    """The segments field's and the RTTM file's cap."""
    return max(MIN_SEGMENTS_BYTES, max_segments * BYTES_PER_SEGMENT)


def _given_segments(sent: upload.Upload, max_segments: int,
                    min_duration_s: float) -> list[SegmentSpec] | None:
    """The segments given (the JSON field, or the RTTM file), checked on their own before any
    decoding: a bad segment costs no decode. None: find the speech."""
    text, rttm = sent.params.get("segments"), sent.texts.get("rttm")
    if text is not None and rttm is not None:
        raise InvalidSegments("give segments (JSON) or rttm (a file), not both")
    if text is not None:
        return parse_json(text, max_segments, min_duration_s)
    if rttm is not None:
        try:
            return parse_rttm(rttm.decode("utf-8-sig"), max_segments, min_duration_s)
        except UnicodeDecodeError:
            raise InvalidSegments("the rttm file is not UTF-8 text") from None
    return None


SEGMENTS = upload.UploadSpec(
    protocol.SegmentsFields, "the recording (any format predict takes)",
    texts={"rttm": "the turns, as RTTM SPEAKER lines"},
    extra_headers=({"name": "Accept", "in": "header", "required": False,
                    "schema": {"type": "string"}, "description": "application/x-ndjson: a "
                    "line per segment as it finishes, then a summary line"},))
router = APIRouter()


@router.post("/v1/segments", summary="Emotion per utterance and per speaker over a whole "
             "recording (docs/segments.md)", openapi_extra=SEGMENTS.openapi(),
             responses={200: {"model": protocol.SegmentsAnswer, "content": {NDJSON: {
                 "schema": {"description": "one SegmentLine a line, then a SummaryLine (or "
                            "an ErrorLine)"}}}},
                 **protocol.errors(400, 401, 404, 409, 413, 415, 422, 429, 501, 503,
                                   504)})
async def segments_route(request: Request, parts: Parts) -> Response:
    return await parts.segments.handle(request)
