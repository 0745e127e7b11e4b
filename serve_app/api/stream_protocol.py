"""The pure parts of WS /v1/stream, with no Ray and no sockets: the query parameters, the
close codes and errors, PCM messages, the window schedule and the session's time limit.
Used by the session loop (serve_app/api/stream.py) and the client
(serve_app/tools/stream_client.py).

Parity with POST /v1/predict starts here: PCM becomes float32 exactly as libsndfile reads a
file of the same samples (int16 / 32768; float32 as is).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from serve_app.config import STREAM_HOP_S, STREAM_WINDOW_S, RouterSettings
from serve_app.errors import ApiError, refuse_unknown
from serve_app.labels import parse_label_set
from serve_app.wire import TARGET_SR, HeadRef

ENCODINGS = {"pcm_s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
SAMPLE_RATES = (8_000, 96_000)
# api_key and session_key: for browsers, which cannot set headers on a WebSocket; the router
# checks the key (serve_app/traffic/access.py) and routes by the session key
# (serve_app/traffic/routing.py).
PARAMS = ("model_version", "sample_rate", "encoding", "window_s", "hop_s", "api_key",
          "session_key", "labels", "segments", "vad", "head")
# Close codes (RFC 6455): normal, policy (bad parameters or input), message too big,
# internal error, try again later (overloaded).
NORMAL, POLICY, TOO_BIG, INTERNAL, TRY_LATER = 1000, 1008, 1009, 1011, 1013
# Ray Serve's proxy starts a request's clock before the router sees it: end a session this
# much before the proxy's request timeout would drop it without a close frame.
PROXY_MARGIN_S = 1.0
_TIMEOUT_HEADER = "x-request-timeout-seconds"  # Ray Serve's per-request timeout override


class StreamError(Exception):
    """Ends a stream: an error event, then a close with `close_code`."""

    def __init__(self, close_code: int, code: str, message: str,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.close_code, self.code, self.message = close_code, code, message
        self.retry_after_s = retry_after_s

    @classmethod
    def from_api(cls, exc: ApiError) -> StreamError:
        """A predict-style error: bad input or no valid key 1008; over the key's quota,
        unavailable, overloaded or slow 1013 (with the Retry-After the API would send)."""
        retry_after = exc.headers.get("Retry-After")
        retry_after_s = float(retry_after) if retry_after else None
        if exc.status == 429 or exc.status in (503, 504):
            return cls(TRY_LATER, exc.code, exc.message, retry_after_s)
        if 400 <= exc.status < 500:
            return cls(POLICY, exc.code, exc.message)
        return cls(INTERNAL, exc.code, exc.message)

    def event(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.retry_after_s is not None:
            error["retry_after_s"] = self.retry_after_s
        return {"type": "error", "error": error}


# -- parameters -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamParams:
    model_version: str | None
    sample_rate: int
    encoding: str
    window_s: float
    hop_s: float
    session_key: str | None = None
    labels: tuple[str, ...] | None = None  # a label set (serve_app/labels.py); None: all
    segments: bool = False  # utterance events (serve_app/api/stream_utterances.py)
    vad: bool = False  # windows without speech are not scored (serve_app/api/stream_vad.py)
    head: str | None = None  # a custom head, NAME[@REV] or a head alias, as asked
    head_ref: HeadRef | None = None  # the revision the router resolved it to


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
    try:
        refuse_unknown(query, PARAMS)
    except ApiError as exc:
        raise StreamError.from_api(exc) from None
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
    try:
        labels = parse_label_set(query.get("labels"))
    except ApiError as exc:
        raise StreamError.from_api(exc) from None
    return StreamParams(
        model_version=query.get("model_version") or None,
        sample_rate=int(_number("sample_rate", query.get("sample_rate", str(TARGET_SR)),
                                *SAMPLE_RATES, integer=True)),
        encoding=encoding, window_s=window_s, hop_s=hop_s,
        session_key=query.get("session_key") or None, labels=labels,
        segments=_flag("segments", query.get("segments")), vad=_flag("vad", query.get("vad")),
        head=query.get("head") or None)


def _flag(name: str, value: str | None) -> bool:
    text = (value or "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise StreamError(POLICY, "invalid_parameter", f"{name} must be true or false, not {value!r}")


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
