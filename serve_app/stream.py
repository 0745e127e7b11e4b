"""Live emotion over a WebSocket (`WS /v1/stream`): mono PCM in, an emotion window each time
the stream passes a multiple of hop_s, and the whole stream's result after `{"type": "end"}`.

The pure parts (parameters, PCM, the window schedule, the session's time limit) need no
cluster; `Streams.run` is the session loop the router hands an accepted socket to.

Parity with POST /v1/predict: a window's samples are converted as the decoder converts a file
of those samples (int16 / 32768, as libsndfile does; float32 as is), resampled on their own
with the decoder's resampler, and sent through the same Variants.predict; so a window scores
exactly as predict on a file of its samples, and the result as predict on the whole stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np

from serve_app import results
from serve_app.audio import to_target_rate
from serve_app.config import STREAM_HOP_S, STREAM_WINDOW_S, RouterSettings
from serve_app.errors import ApiError

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

    from serve_app.metrics import StreamMetrics
    from serve_app.variants import Variants

access_log = logging.getLogger("ray.serve.emotion2vec.access")

ENCODINGS = {"pcm_s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
SAMPLE_RATES = (8_000, 96_000)
PARAMS = ("model_version", "sample_rate", "encoding", "window_s", "hop_s",
          "api_key")  # api_key: accepted, not checked here
# Close codes (RFC 6455): normal, policy (bad parameters or input), message too big,
# internal error, try again later (overloaded).
NORMAL, POLICY, TOO_BIG, INTERNAL, TRY_LATER = 1000, 1008, 1009, 1011, 1013
# Ray Serve's proxy starts a request's clock before the router sees it: end a session this
# much before the proxy's request timeout would drop it without a close frame.
PROXY_MARGIN_S = 1.0
_TIMEOUT_HEADER = "x-request-timeout-seconds"  # Ray Serve's per-request timeout override


class StreamError(Exception):
    """Ends a stream: an error event, then a close with `close_code`."""

    def __init__(self, close_code: int, code: str, message: str):
        super().__init__(message)
        self.close_code, self.code, self.message = close_code, code, message

    @classmethod
    def from_api(cls, exc: ApiError) -> "StreamError":
        """A predict-style error: bad input 1008; unavailable, overloaded or slow 1013."""
        if 400 <= exc.status < 500:
            return cls(POLICY, exc.code, exc.message)
        if exc.status in (503, 504):
            return cls(TRY_LATER, exc.code, exc.message)
        return cls(INTERNAL, exc.code, exc.message)

    def event(self) -> dict:
        return {"type": "error", "error": {"code": self.code, "message": self.message}}


class _Disconnected(Exception):
    """The client went away: nothing more can be sent."""


# -- parameters -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamParams:
    model_version: str | None
    sample_rate: int
    encoding: str
    window_s: float
    hop_s: float


def _number(name: str, value: str, low: float, high: float, integer: bool = False) -> float:
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and low <= number <= high):
        kind = "an integer" if integer else "a number"
        raise StreamError(POLICY, "invalid_parameter",
                          f"{name} must be {kind} from {low:g} to {high:g}, not {value!r}")
    return number


def parse_params(query: Mapping[str, str], settings: RouterSettings) -> StreamParams:
    unknown = sorted(set(query) - set(PARAMS))
    if unknown:
        raise StreamError(POLICY, "unknown_field",
                          f"unknown parameters {unknown}; expected {list(PARAMS)}")
    encoding = query.get("encoding", "pcm_s16le")
    if encoding not in ENCODINGS:
        raise StreamError(POLICY, "invalid_parameter",
                          f"encoding must be one of {list(ENCODINGS)}, not {encoding!r}")
    window_s = _number("window_s", query.get("window_s", str(settings.stream_window_s)),
                       *STREAM_WINDOW_S)
    hop_s = _number("hop_s", query.get("hop_s", str(settings.stream_hop_s)), *STREAM_HOP_S)
    if hop_s > window_s:
        raise StreamError(POLICY, "invalid_parameter",
                          f"hop_s ({hop_s:g}) must not exceed window_s ({window_s:g})")
    return StreamParams(
        model_version=query.get("model_version") or None,
        sample_rate=int(_number("sample_rate", query.get("sample_rate", "16000"),
                                *SAMPLE_RATES, integer=True)),
        encoding=encoding, window_s=window_s, hop_s=hop_s)


def session_limit_s(max_session_s: float, proxy_timeout_s: float | None,
                    headers: Mapping[str, str]) -> float:
    """How long this session may last: the router's limit, and under the proxy's timeout for
    this request (its http_options.request_timeout_s, or the client's own
    x-request-timeout-seconds header, which Ray Serve lets override it; <= 0 disables it)."""
    timeout = proxy_timeout_s
    if _TIMEOUT_HEADER in headers:
        try:
            value = float(headers[_TIMEOUT_HEADER])
            timeout = value if value > 0 else None
        except ValueError:
            pass  # Ray ignores a malformed header too
    if timeout is None:
        return max_session_s
    return max(0.0, min(max_session_s, timeout - PROXY_MARGIN_S))


# -- PCM --------------------------------------------------------------------------------------
def pcm_to_float32(data: bytes, encoding: str) -> np.ndarray:
    """One message of PCM -> float32 samples, as libsndfile reads a file of them."""
    dtype = ENCODINGS[encoding]
    if len(data) % dtype.itemsize:
        raise StreamError(POLICY, "invalid_pcm", f"a {encoding} message must hold whole "
                          f"{dtype.itemsize}-byte samples; got {len(data)} bytes")
    samples = np.frombuffer(data, dtype=dtype)
    if encoding == "pcm_s16le":
        return samples.astype(np.float32) * np.float32(1 / 32768)
    samples = samples.astype(np.float32)
    if not np.isfinite(samples).all():
        raise StreamError(POLICY, "invalid_samples", "the audio contains NaN or infinite samples")
    return samples


class SampleBuffer:
    """All samples received so far (float32, at the client's rate), grown by doubling."""

    def __init__(self) -> None:
        self._data = np.zeros(1 << 14, np.float32)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, samples: np.ndarray) -> None:
        needed = self._size + len(samples)
        if needed > len(self._data):
            grown = np.zeros(max(needed, 2 * len(self._data)), np.float32)
            grown[:self._size] = self._data[:self._size]
            self._data = grown
        self._data[self._size:needed] = samples
        self._size = needed

    def slice(self, start: int, end: int) -> np.ndarray:
        return self._data[start:min(end, self._size)].copy()


# -- the window schedule ----------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    index: int       # k: the window ends at k * hop_s
    start: int       # sample range [start, end) at the client's rate
    end: int
    start_s: float
    end_s: float
    skipped: int     # windows passed over since the previous event
    due_at: float    # when its last sample arrived (monotonic seconds)


class WindowSchedule:
    """Which window is due: window k ends at sample round(k * hop_s * rate) and starts
    window_s before (at 0 at the earliest). When inference falls behind, only the newest due
    window runs; the ones passed over are counted into the next window's `skipped`."""

    def __init__(self, sample_rate: int, window_s: float, hop_s: float):
        self.rate, self.hop_s = sample_rate, hop_s
        self.window = int(window_s * sample_rate + 0.5)
        self._next = 1                            # the first window not yet due
        self._due: list[tuple[int, float]] = []   # (k, due_at) of due windows not yet taken
        self._carried = 0                         # skipped, not yet reported

    def end_sample(self, k: int) -> int:
        return int(k * self.hop_s * self.rate + 0.5)

    def windows_in(self, samples: int) -> int:
        """How many windows a stream of `samples` samples passes."""
        k = int(samples / (self.hop_s * self.rate)) + 1
        while k > 0 and self.end_sample(k) > samples:
            k -= 1
        return k

    def advance(self, samples: int, now: float) -> None:
        """The stream now holds `samples` samples, the last ones arrived at `now`."""
        while self.end_sample(self._next) <= samples:
            self._due.append((self._next, now))
            self._next += 1

    def take(self) -> Window | None:
        """The newest due window, or None; the older due ones are skipped."""
        if not self._due:
            return None
        k, due_at = self._due[-1]
        skipped = self._carried + len(self._due) - 1
        self._due, self._carried = [], 0
        end = self.end_sample(k)
        start = max(0, end - self.window)
        return Window(k, start, end, round(start / self.rate, 6), round(end / self.rate, 6),
                      skipped, due_at)

    @property
    def carried(self) -> int:
        return self._carried

    def drop(self, window: Window) -> None:
        """The window could not run (the variant was at capacity): report it as skipped."""
        self._carried += window.skipped + 1


# -- the session ------------------------------------------------------------------------------
@dataclass
class _Limits:
    max_samples: int
    max_message_bytes: int
    idle_timeout_s: float
    session_s: float


class Streams:
    """The open streams of one router replica: the cap on them, their metrics, and the loop
    that serves each."""

    def __init__(self, variants: "Variants", metrics: "StreamMetrics"):
        self.variants = variants
        self.metrics = metrics
        self.active: dict[str, int] = {}
        self._proxy_timeout: float | None = None
        self._proxy_timeout_known = False

    @property
    def open_count(self) -> int:
        return sum(self.active.values())

    async def proxy_timeout_s(self) -> float | None:
        """The Serve proxy's request_timeout_s (fixed while Serve runs), read once."""
        if not self._proxy_timeout_known:
            try:
                from ray.serve.context import _get_global_client

                config = await asyncio.to_thread(lambda: _get_global_client().http_config)
                self._proxy_timeout = config.request_timeout_s
            except Exception as exc:  # no controller reachable: rely on stream_max_session_s
                access_log.warning("could not read the proxy's request timeout: %r", exc)
            self._proxy_timeout_known = True
        return self._proxy_timeout

    async def run(self, websocket: "WebSocket", variant: str, params: StreamParams,
                  settings: RouterSettings, request_id: str, started: float) -> None:
        """Serve one accepted socket to its end; never raises but CancelledError."""
        limits = _Limits(
            max_samples=int(min(settings.stream_max_s, settings.max_duration_s)
                            * params.sample_rate),
            max_message_bytes=settings.stream_max_message_bytes,
            idle_timeout_s=settings.stream_idle_timeout_s,
            session_s=session_limit_s(settings.stream_max_session_s,
                                      await self.proxy_timeout_s(), websocket.headers))
        session = _Session(websocket, self, variant, params, settings, request_id, limits,
                           started)
        if self.open_count >= settings.max_streams:
            await refuse(websocket, StreamError(
                TRY_LATER, "too_many_streams",
                f"this router replica has {settings.max_streams} streams open; retry later"))
            return
        self.active[variant] = self.active.get(variant, 0) + 1
        self.metrics.set_active(variant, self.active[variant])
        try:
            await session.run()
        finally:
            self.active[variant] -= 1
            self.metrics.set_active(variant, self.active[variant])
            session.flush_seconds()


async def refuse(websocket: "WebSocket", error: StreamError) -> None:
    """Send the error event and close with its code; a gone client is no error."""
    try:
        await websocket.send_text(json.dumps(error.event()))
        await websocket.close(code=error.close_code, reason=error.code[:120])
    except Exception:
        pass


class _Session:
    def __init__(self, websocket: "WebSocket", streams: Streams, variant: str,
                 params: StreamParams, settings: RouterSettings, request_id: str,
                 limits: _Limits, started: float):
        self.ws, self.streams, self.variant = websocket, streams, variant
        self.params, self.settings, self.limits = params, settings, limits
        self.request_id, self.started = request_id, started
        self.deadline = started + limits.session_s
        self.buffer = SampleBuffer()
        self.schedule = WindowSchedule(params.sample_rate, params.window_s, params.hop_s)
        self.windows = self.skipped = 0
        self._unreported_s = 0.0

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        trace = {"request_id": self.request_id, "variant": self.variant, "kind": "stream",
                 "sample_rate": self.params.sample_rate, "encoding": self.params.encoding}
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
            trace.update(close_code=close_code,
                         audio_s=round(len(self.buffer) / self.params.sample_rate, 3),
                         windows=self.windows, skipped=self.skipped,
                         total_ms=round((time.monotonic() - self.started) * 1000, 1))
            access_log.info(json.dumps(trace))

    async def _stream(self) -> None:
        """Receive audio and emit windows until `end` and the last due window; at most one
        window inference runs at a time (the backpressure: later windows wait or skip)."""
        receive: asyncio.Future | None = asyncio.ensure_future(self.ws.receive())
        inference: asyncio.Future | None = None
        last_message = time.monotonic()
        try:
            while True:
                if inference is None:
                    window = self.schedule.take()
                    if window is not None:
                        inference = asyncio.ensure_future(self._window_event(window))
                if receive is None and inference is None:
                    return
                deadline = self.deadline if receive is None else \
                    min(self.deadline, last_message + self.limits.idle_timeout_s)
                done, _ = await asyncio.wait(
                    [task for task in (receive, inference) if task is not None],
                    timeout=max(0.0, deadline - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise self._timeout_error()
                if inference in done:
                    event, inference = inference.result(), None
                    if event is not None:
                        await self._send(event)
                if receive in done:
                    last_message = time.monotonic()
                    ended = self._receive(receive.result(), last_message)
                    receive = None if ended else asyncio.ensure_future(self.ws.receive())
        finally:
            for task in (receive, inference):
                if task is not None and not task.done():
                    task.cancel()

    def _timeout_error(self) -> StreamError:
        if time.monotonic() >= self.deadline - 1e-3:
            return StreamError(POLICY, "session_timeout",
                               f"the stream lasted over {self.limits.session_s:g} s")
        return StreamError(POLICY, "idle_timeout", "no message for "
                           f"{self.limits.idle_timeout_s:g} s; send audio or {{\"type\": \"end\"}}")

    async def _within_session(self, work):
        try:
            return await asyncio.wait_for(work, max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:
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
                "sample_rate": params.sample_rate, "encoding": params.encoding,
                "window_s": params.window_s, "hop_s": params.hop_s,
                "limits": {"max_stream_s": limits.max_samples / params.sample_rate,
                           "max_session_s": round(limits.session_s, 3),
                           "idle_timeout_s": limits.idle_timeout_s,
                           "max_message_bytes": limits.max_message_bytes}}

    async def _predict(self, samples: np.ndarray) -> dict:
        waveform = await asyncio.to_thread(to_target_rate, samples, self.params.sample_rate)
        try:
            return await self.streams.variants.predict(
                self.variant, waveform, "utterance", False, self.settings.model_timeout_s)
        except ApiError as exc:
            raise StreamError.from_api(exc) from None

    async def _window_event(self, window: Window) -> dict | None:
        try:
            out = await self._predict(self.buffer.slice(window.start, window.end))
        except StreamError as exc:
            if exc.code != "overloaded":
                raise
            self.schedule.drop(window)  # the variant is at capacity: a later window will run
            return None
        self.windows += 1
        self.skipped += window.skipped
        return {"type": "window", **results.timeline_window(
                    out["labels"], {"start_s": window.start_s, "end_s": window.end_s,
                                    "scores": out["scores"]}),
                "skipped": window.skipped, "_due_at": window.due_at}

    async def _result(self) -> dict:
        rate = self.params.sample_rate
        duration = len(self.buffer) / rate
        if not len(self.buffer):
            raise StreamError(POLICY, "empty_audio", "the stream ended without audio")
        if duration < self.settings.min_duration_s:
            raise StreamError(POLICY, "audio_too_short",
                              f"the stream lasted {duration * 1000:.0f} ms; at least "
                              f"{self.settings.min_duration_s * 1000:.0f} ms are needed")
        out = await self._predict(self.buffer.slice(0, len(self.buffer)))
        body = results.prediction(
            out, request_id=self.request_id, variant=self.variant, granularity="utterance",
            audio=results.audio_fields(duration, rate, 1, self.params.encoding),
            extract_embedding=False)
        return {"type": "result", **body, "windows": self.windows,
                "skipped": self.skipped + self.schedule.carried}

    async def _send(self, event: dict) -> None:
        due_at = event.pop("_due_at", None)
        try:
            await self.ws.send_text(json.dumps(event))
        except Exception as exc:  # the socket is gone (closed by the client, or reset)
            raise _Disconnected(None) from exc
        if due_at is not None:
            self.streams.metrics.event_lag(self.variant, (time.monotonic() - due_at) * 1000)
