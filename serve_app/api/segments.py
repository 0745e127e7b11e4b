"""POST /v1/segments: a whole recording, scored utterance by utterance, as a thin adapter over
the request pipeline (serve_app/api/pipeline.py): the same admission (the recording's
duration is charged), routing, decoding (with the route's own limits), variant calls (each
segment is a predict of its samples, with the router's model timeout), errors, shadow, access
log and metrics as predict.

The steps: read the request (serve_app/api/segments_upload.py); check given segments before
decoding (serve_app/segments/spec.py); decode, keeping the channels apart for
channels=split; check the given segments against the audio, or find the speech with the VAD
deployment (serve_app/voice_activity.py); score the segments, at most segments_in_flight at
once (serve_app/segments/runner.py); answer as JSON, or as NDJSON lines as segments finish.
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
import ray
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app.api import responses as results
from serve_app.api import upload
from serve_app.api.pipeline import Call, Pipeline
from serve_app.api.segments_upload import SegmentsUpload, read_segments_upload
from serve_app.audio.waveform import DecodedAudio
from serve_app.config import RouterSettings, SegmentSettings, VadSettings
from serve_app.errors import ApiError
from serve_app.labels import parse_label_set
from serve_app.metrics import SegmentMetrics
from serve_app.segments.runner import RecordingSlots, score_all
from serve_app.segments.spec import (
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
# A segment the variant refuses as overloaded is tried again, this many times in all.
OVERLOADED_TRIES = 4
OVERLOADED_WAIT_S = 1.0


class SpeechFinder:
    """Calls the VAD deployment: its spans for a 16 kHz waveform, within vad_timeout_s."""

    def __init__(self, handle: DeploymentHandle | None, metrics: SegmentMetrics):
        self.handle = handle
        self.metrics = metrics

    async def find(self, waveform: np.ndarray, vad: VadSettings,
                   timeout_s: float) -> tuple[list[tuple[int, int]], float]:
        if self.handle is None:
            raise ApiError(501, "vad_not_deployed", "this application has no VAD deployment: "
                           "give the segments (segments or rttm)")
        response = self.handle.speech.remote(waveform, vad.model_dump())
        try:
            out = await asyncio.wait_for(response, timeout=timeout_s)
        except TimeoutError:
            response.cancel()
            raise ApiError(504, "vad_timeout", f"the VAD did not answer within {timeout_s:g} s",
                           headers={"Retry-After": "5"}) from None
        except BackPressureError:
            raise ApiError(503, "overloaded", "the VAD is at capacity; retry later",
                           headers={"Retry-After": "2"}) from None
        except ray.exceptions.RayError as exc:
            logger.error("the VAD failed: %s", exc)
            raise ApiError(503, "vad_unavailable", "the VAD failed on this recording; retry",
                           headers={"Retry-After": "2"}) from None
        self.metrics.vad(out["vad_ms"])
        return [tuple(span) for span in out["spans"]], out["vad_ms"]


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
    def __init__(self, pipeline: Pipeline, vad: DeploymentHandle | None,
                 metrics: SegmentMetrics):
        self.pipeline = pipeline
        self.metrics = metrics
        self.finder = SpeechFinder(vad, metrics)
        self.slots = RecordingSlots(metrics.set_active)

    async def handle(self, request: Request) -> Response:
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
        sent: SegmentsUpload = await read_segments_upload(request, limits.max_recording_bytes,
                                                          limits.max_segments)
        route = call.resolve(sent.params.get("model_version"),
                             request.headers.get("x-session-key"))
        options = InferenceOptions(
            extract_embedding=upload.parse_bool("extract_embedding",
                                                sent.params.get("extract_embedding")),
            labels=parse_label_set(sent.params.get("labels")))  # a label set for every segment
        specs = None  # checked on their own first: a bad segment costs no decode
        if sent.segments is not None:
            specs = parse_json(sent.segments, limits.max_segments, settings.min_duration_s)
        elif sent.rttm is not None:
            specs = parse_rttm(sent.rttm, limits.max_segments, settings.min_duration_s)
        audio = await call.decode(sent.data, limits.decode_limits(settings.decode_limits(),
                                                                  sent.split))
        waves = [audio.waveform]
        if sent.split:
            if audio.channels < 2:
                raise ApiError(422, "invalid_parameter", "channels=split scores each channel "
                               "of a recording on its own; this one has 1 channel")
            waves = list(audio.channel_waveforms)
        if specs is not None:
            spans = to_spans(specs, len(waves[0]), settings.min_duration_s,
                             settings.max_duration_s, len(waves) if sent.split else None)
            check_coverage(spans, len(waves[0]), len(waves))
            job = Job(route, options, audio, waves, spans, "given")
        else:
            spans, vad_ms = await self._find_speech(waves, limits, sent.split)
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
