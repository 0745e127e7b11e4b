"""Live emotion over a WebSocket (`WS /v1/stream`): mono PCM in, an emotion window each time
the stream passes a multiple of hop_s, and the whole stream's result after `{"type": "end"}`.
`Streams.run` is the session loop the router hands an accepted socket to; the protocol's pure
parts (parameters, PCM, the window schedule, limits) are in serve_app/api/stream_protocol.py.

Parity with POST /v1/predict: a window's samples are converted as the decoder converts a file
of those samples, resampled on their own with the decoder's resampler, and sent through the
same Variants.predict; so a window scores exactly as predict on a file of its samples, and the
result as predict on the whole stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from serve_app.api import responses as results
from serve_app.api.stream_protocol import (
    INTERNAL,
    NORMAL,
    POLICY,
    TOO_BIG,
    TRY_LATER,
    SampleBuffer,
    StreamError,
    StreamParams,
    Window,
    WindowSchedule,
    pcm_to_float32,
    session_limit_s,
)
from serve_app.api.stream_utterances import LiveUtterances
from serve_app.api.stream_vad import SpeechGate, vad_refusal
from serve_app.audio.waveform import to_target_rate
from serve_app.config import RouterSettings
from serve_app.errors import ApiError
from serve_app.wire import (
    Granularity,
    InferenceOptions,
    InferenceRequest,
    TimelineWindow,
    VariantAnswer,
)

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

    from serve_app.api.vad_client import SpeechFinder
    from serve_app.api.variant_client import Variants
    from serve_app.metrics import StreamMetrics
    from serve_app.traffic.routing import Route

access_log = logging.getLogger("ray.serve.emotion2vec.access")


class _Disconnected(Exception):
    """The client went away: nothing more can be sent."""


@dataclass
class StreamHooks:
    """What the router adds to a stream: `charge(seconds)` for the audio as it arrives (may
    raise an ApiError, a key over its audio quota, which ends the stream), `on_result(waveform,
    answer)` once the whole stream was answered (the shadow), and fields for its access-log
    line."""

    charge: Callable[[float], None] = lambda seconds: None
    on_result: Callable[[np.ndarray, VariantAnswer], None] = lambda waveform, answer: None
    log_fields: dict = field(default_factory=dict)


@dataclass
class _Limits:
    max_samples: int
    max_message_bytes: int
    idle_timeout_s: float
    session_s: float


class Streams:
    """The open streams of one router replica: the cap on them, their metrics, and the loop
    that serves each."""

    def __init__(self, variants: Variants, metrics: StreamMetrics,
                 finder: SpeechFinder | None = None):
        self.variants = variants
        self.metrics = metrics
        self.finder = finder  # the VAD, for segments=true and vad=true
        self.active: dict[str, int] = {}
        self._proxy_timeout: float | None = None
        self._proxy_timeout_known = False

    @property
    def open_count(self) -> int:
        return sum(self.active.values())

    async def proxy_timeout_s(self) -> float | None:
        """The Serve proxy's request_timeout_s (fixed while Serve runs), read once."""
        if not self._proxy_timeout_known:
            import ray

            if not ray.is_initialized():  # served in-process, not by Serve: no proxy
                self._proxy_timeout_known = True
                return None
            try:
                from ray.serve.context import _get_global_client

                config = await asyncio.to_thread(lambda: _get_global_client().http_config)
                self._proxy_timeout = config.request_timeout_s
            except Exception as exc:  # no controller reachable: rely on stream_max_session_s
                access_log.warning("could not read the proxy's request timeout: %r", exc)
            self._proxy_timeout_known = True
        return self._proxy_timeout

    async def run(self, websocket: WebSocket, route: Route, params: StreamParams,
                  settings: RouterSettings, request_id: str, started: float,
                  hooks: StreamHooks) -> int:
        """Serve one accepted socket to its end; returns the close code; never raises but
        CancelledError. Its access-log fields go into hooks.log_fields."""
        variant = route.variant
        limits = _Limits(
            max_samples=int(min(settings.stream_max_s, settings.max_duration_s)
                            * params.sample_rate),
            max_message_bytes=settings.stream_max_message_bytes,
            idle_timeout_s=settings.stream_idle_timeout_s,
            session_s=session_limit_s(settings.stream_max_session_s,
                                      await self.proxy_timeout_s(), websocket.headers))
        refused = vad_refusal(params, self.finder)
        if self.open_count >= settings.max_streams:
            refused = StreamError(
                TRY_LATER, "too_many_streams",
                f"this router replica has {settings.max_streams} streams open; retry later")
        if refused is not None:
            hooks.log_fields["code"] = refused.code
            await refuse(websocket, refused)
            return refused.close_code
        session = _Session(websocket, self, route, params, settings, request_id, limits,
                           started, hooks)
        self.active[variant] = self.active.get(variant, 0) + 1
        self.metrics.set_active(variant, self.active[variant])
        try:
            return await session.run()
        finally:
            self.active[variant] -= 1
            self.metrics.set_active(variant, self.active[variant])
            session.flush_seconds()


async def refuse(websocket: WebSocket, error: StreamError) -> None:
    """Send the error event and close with its code; a gone client is no error."""
    try:
        await websocket.send_text(json.dumps(error.event()))
        await websocket.close(code=error.close_code, reason=error.code[:120])
    except Exception:
        pass


class _Session:
    def __init__(self, websocket: WebSocket, streams: Streams, route: Route,
                 params: StreamParams, settings: RouterSettings, request_id: str,
                 limits: _Limits, started: float, hooks: StreamHooks):
        self.ws, self.streams, self.hooks = websocket, streams, hooks
        self.variant, self.routed_by = route.variant, route.routed_by
        self.params, self.settings, self.limits = params, settings, limits
        self.request_id, self.started = request_id, started
        self.deadline = started + limits.session_s
        self.buffer = SampleBuffer()
        self.schedule = WindowSchedule(params.sample_rate, params.window_s, params.hop_s)
        self.utterances = LiveUtterances.through(
            streams.finder, settings.segments, params.sample_rate, self.variant,
            self._predict) if params.segments else None
        self.gate = SpeechGate(streams.finder, settings.segments, streams.metrics,
                               self.variant) if params.vad else None
        self.windows = self.skipped = 0
        self._unreported_s = 0.0

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> int:
        """The session to its end; its close code. Its fields join the request's access-log
        line (hooks.log_fields), which the request pipeline writes."""
        trace = self.hooks.log_fields
        trace.update(sample_rate=self.params.sample_rate, encoding=self.params.encoding)
        close_code = NORMAL
        try:
            await self._send(self._ready())
            await self._stream()
            result = await self._within_session(self._result())
            await self._send(result)
            try:
                await self.ws.close(code=NORMAL)
            except Exception:  # the client closed first: nothing is lost
                pass
        except StreamError as exc:
            close_code, trace["code"] = exc.close_code, exc.code
            await refuse(self.ws, exc)
        except _Disconnected as exc:
            close_code, trace["code"] = exc.args[0] if exc.args else None, "client_disconnected"
        except Exception as exc:  # a bug: say so, never leave the client hanging
            access_log.exception("stream %s failed", self.request_id)
            close_code, trace["code"] = INTERNAL, "internal_error"
            await refuse(self.ws, StreamError(INTERNAL, "internal_error",
                                              f"the stream failed: {type(exc).__name__}"))
        finally:
            trace.update(close_code=close_code, windows=self.windows, skipped=self.skipped,
                         utterances=self.utterances.count if self.utterances else None,
                         silent=self.gate.silent if self.gate else None)
        return close_code

    async def _stream(self) -> None:
        """Receive audio and emit windows until `end` and the last due window; at most one
        window inference runs at a time (the backpressure: later windows wait or skip). With
        segments=true, utterance work (VAD on the open region, then scoring) runs beside it,
        one piece at a time, and ends with the stream."""
        receive: asyncio.Future | None = asyncio.ensure_future(self.ws.receive())
        inference: asyncio.Future | None = None
        utterances: asyncio.Future | None = None
        last_message = time.monotonic()
        try:
            while True:
                if inference is None:
                    window = self.schedule.take()
                    if window is not None:
                        inference = asyncio.ensure_future(self._window_event(window))
                if utterances is None and self.utterances is not None:
                    utterances = self.utterances.start(self.buffer, final=receive is None)
                if receive is None and inference is None and utterances is None:
                    return
                deadline = self.deadline if receive is None else \
                    min(self.deadline, last_message + self.limits.idle_timeout_s)
                done, _ = await asyncio.wait(
                    [task for task in (receive, inference, utterances) if task is not None],
                    timeout=max(0.0, deadline - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise self._timeout_error()
                if inference in done:
                    outcome, inference = inference.result(), None
                    if outcome is not None:
                        event, due_at = outcome
                        await self._send(event)
                        self.streams.metrics.event_lag(self.variant,
                                                       (time.monotonic() - due_at) * 1000)
                if utterances in done:
                    events, utterances = utterances.result(), None
                    for event in events:
                        await self._send(event)
                if receive in done:
                    last_message = time.monotonic()
                    ended = self._receive(receive.result(), last_message)
                    receive = None if ended else asyncio.ensure_future(self.ws.receive())
        finally:
            for task in (receive, inference, utterances):
                if task is not None and not task.done():
                    task.cancel()

    def _timeout_error(self) -> StreamError:
        if time.monotonic() >= self.deadline - 1e-3:
            return StreamError(POLICY, "session_timeout",
                               f"the stream lasted over {self.limits.session_s:g} s")
        return StreamError(POLICY, "idle_timeout", "no message for "
                           f"{self.limits.idle_timeout_s:g} s; send audio, or end the stream")

    async def _within_session(self, work):
        try:
            return await asyncio.wait_for(work, max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            raise self._timeout_error() from None

    # -- messages in ------------------------------------------------------------------------
    def _receive(self, message: dict, now: float) -> bool:
        """Take one message; True when it is the end of the audio."""
        if message["type"] == "websocket.disconnect":
            raise _Disconnected(message.get("code"))
        data, text = message.get("bytes"), message.get("text")
        size = len(data) if data is not None else len((text or "").encode())
        if size > self.limits.max_message_bytes:
            raise StreamError(TOO_BIG, "message_too_large", f"a message of {size} bytes; the "
                              f"limit is {self.limits.max_message_bytes}")
        if data is None:
            try:
                ended = json.loads(text or "").get("type") == "end"
            except (ValueError, AttributeError):
                ended = False
            if not ended:
                raise StreamError(POLICY, "invalid_message", 'text messages must be '
                                  '{"type": "end"}; send audio as binary messages')
            return True
        samples = pcm_to_float32(data, self.params.encoding)
        if len(self.buffer) + len(samples) > self.limits.max_samples:
            limit_s = self.limits.max_samples / self.params.sample_rate
            raise StreamError(POLICY, "stream_too_long",
                              f"the stream is longer than the limit of {limit_s:g} s")
        try:
            self.hooks.charge(len(samples) / self.params.sample_rate)
        except ApiError as exc:  # the key's audio quota is spent
            raise StreamError.from_api(exc) from None
        self.buffer.append(samples)
        self.schedule.advance(len(self.buffer), now)
        self._unreported_s += len(samples) / self.params.sample_rate
        if self._unreported_s >= 1.0:
            self.flush_seconds()
        return False

    def flush_seconds(self) -> None:
        if self._unreported_s > 0:
            self.streams.metrics.streamed(self.variant, self._unreported_s)
            self._unreported_s = 0.0

    # -- events out -------------------------------------------------------------------------
    def _ready(self) -> dict:
        params, limits = self.params, self.limits
        return {"type": "ready", "request_id": self.request_id, "model_version": self.variant,
                "routed_by": self.routed_by, "sample_rate": params.sample_rate,
                **({"head": params.head_ref.answer()} if params.head_ref else {}),
                "encoding": params.encoding,
                **({"segments": True} if params.segments else {}),
                **({"vad": True} if params.vad else {}),
                "window_s": params.window_s, "hop_s": params.hop_s,
                "limits": {"max_stream_s": limits.max_samples / params.sample_rate,
                           "max_session_s": round(limits.session_s, 3),
                           "idle_timeout_s": limits.idle_timeout_s,
                           "max_message_bytes": limits.max_message_bytes}}

    async def _predict(self, samples: np.ndarray) -> tuple[np.ndarray, VariantAnswer]:
        """The 16 kHz waveform of these samples, and the variant's answer for it."""
        waveform = await asyncio.to_thread(to_target_rate, samples, self.params.sample_rate)
        return waveform, await self._score(waveform)

    async def _score(self, waveform: np.ndarray) -> VariantAnswer:
        """The variant's answer for a 16 kHz waveform."""
        try:
            request = InferenceRequest(waveform, InferenceOptions(labels=self.params.labels,
                                                                  head=self.params.head_ref))
            return await self.streams.variants.predict(self.variant, request,
                                                       self.settings.model_timeout_s)
        except ApiError as exc:
            raise StreamError.from_api(exc) from None

    async def _window_event(self, window: Window) -> tuple[dict, float] | None:
        """The window's event and when its last sample arrived; None if it was skipped. With
        vad=true, a window without speech is not scored (serve_app/api/stream_vad.py)."""
        samples = self.buffer.slice(window.start, window.end)
        waveform = await asyncio.to_thread(to_target_rate, samples, self.params.sample_rate)
        try:
            speech = self.gate is None or await self.gate.has_speech(waveform)
            answer = await self._score(waveform) if speech else None
        except StreamError as exc:
            if exc.code != "overloaded":
                raise
            self.schedule.drop(window)  # the variant (or VAD) is at capacity: a later window
            return None
        self.windows += 1
        self.skipped += window.skipped
        if answer is None:
            return self.gate.silent_event(window), window.due_at
        event = {"type": "window", **results.timeline_window(
                     answer.labels, TimelineWindow(window.start_s, window.end_s, answer.scores)),
                 **({"speech": True} if self.gate else {}), "skipped": window.skipped}
        return event, window.due_at

    async def _result(self) -> dict:
        rate = self.params.sample_rate
        duration = len(self.buffer) / rate
        if not len(self.buffer):
            raise StreamError(POLICY, "empty_audio", "the stream ended without audio")
        if duration < self.settings.min_duration_s:
            raise StreamError(POLICY, "audio_too_short",
                              f"the stream lasted {duration * 1000:.0f} ms; at least "
                              f"{self.settings.min_duration_s * 1000:.0f} ms are needed")
        waveform, answer = await self._predict(self.buffer.slice(0, len(self.buffer)))
        self.hooks.on_result(waveform, answer)
        body = results.prediction(
            answer, request_id=self.request_id, variant=self.variant, routed_by=self.routed_by,
            granularity=Granularity.UTTERANCE,
            audio=results.audio_fields(duration, rate, 1, self.params.encoding),
            extract_embedding=False)
        if self.utterances is not None:
            body["utterances"] = self.utterances.count
        if self.gate is not None:
            body["silent"] = self.gate.silent
        return {"type": "result", **body, "windows": self.windows,
                "skipped": self.skipped + self.schedule.carried}

    async def _send(self, event: dict) -> None:
        try:
            await self.ws.send_text(json.dumps(event))
        except Exception as exc:  # the socket is gone (closed by the client, or reset)
            raise _Disconnected(None) from exc
