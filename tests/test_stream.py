"""WS /v1/stream through the real Serve proxy with a real WebSocket client: the ready event,
window timing and count, parity of every window and of the result with POST /v1/predict, each
error and limit, and client disconnects that leak nothing. The pure parts first, without a
cluster."""

from __future__ import annotations

import asyncio
import io
import json
import math
import socket
import time
from contextlib import contextmanager
from urllib.parse import urlencode

import numpy as np
import pytest
import soundfile
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from serve_app.api import stream_protocol as protocol
from serve_app.audio import sndfile
from serve_app.audio.waveform import to_target_rate
from serve_app.config import RouterSettings
from serve_app.errors import ApiError
from tests.clips import tone
from tests.conftest import APP_NAME
from tests.waiting import Scrape, eventually, scrape

EMOTIONS = ["angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised",
            "unknown"]
TOLERANCE = 1e-4


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """A WAV file of exactly these samples: 16-bit for int16, float for float32."""
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV",
                    subtype="PCM_16" if samples.dtype == np.int16 else "FLOAT")
    return buffer.getvalue()


def as_int16(samples: np.ndarray) -> np.ndarray:
    return np.round(samples * 32767).astype(np.int16)


# -- pure parts -------------------------------------------------------------------------------
def test_pcm_becomes_what_libsndfile_reads_from_a_file_of_it():
    rng = np.random.default_rng(0)
    ints = rng.integers(-32768, 32768, 4000).astype(np.int16)
    floats = rng.uniform(-1, 1, 4000).astype(np.float32)
    for samples, encoding in ((ints, "pcm_s16le"), (floats, "f32le")):
        read, _ = soundfile.read(io.BytesIO(wav_bytes(samples, 16_000)), dtype="float32")
        converted = protocol.pcm_to_float32(samples.astype(samples.dtype.newbyteorder("<"))
                                          .tobytes(), encoding)
        assert converted.dtype == np.float32 and np.array_equal(converted, read), encoding
    with pytest.raises(protocol.StreamError, match="whole 2-byte samples") as bad:
        protocol.pcm_to_float32(b"\x00\x01\x02", "pcm_s16le")
    assert (bad.value.close_code, bad.value.code) == (1008, "invalid_pcm")
    with pytest.raises(protocol.StreamError) as bad:
        protocol.pcm_to_float32(np.array([0.1, np.inf], "<f4").tobytes(), "f32le")
    assert bad.value.code == "invalid_samples"


def test_windows_are_resampled_like_the_decoder_does():
    samples = tone(1.0, 22_050)
    decoded = sndfile.decode(wav_bytes(samples, 22_050), max_duration_s=10, min_duration_s=0.1)
    assert np.array_equal(to_target_rate(samples, 22_050), decoded.waveform)


def test_parameters_defaults_and_bounds():
    settings = RouterSettings(stream_window_s=3.0, stream_hop_s=1.0)
    params = protocol.parse_params({}, settings)
    assert params == protocol.StreamParams(None, 16_000, "pcm_s16le", 3.0, 1.0)
    params = protocol.parse_params({"model_version": "fast", "sample_rate": "44100",
                                  "encoding": "f32le", "window_s": "1.5", "hop_s": "0.25",
                                  "api_key": "ignored", "labels": "sad,Happy"}, settings)
    assert params == protocol.StreamParams("fast", 44_100, "f32le", 1.5, 0.25,
                                           labels=("sad", "happy"))
    for query, message in [({"sample_rate": "16000.0"}, "integer"),
                           ({"sample_rate": "4000"}, "sample_rate"),
                           ({"encoding": "mp3"}, "encoding"), ({"window_s": "nan"}, "window_s"),
                           ({"window_s": "31"}, "window_s"), ({"hop_s": "0.05"}, "hop_s"),
                           ({"window_s": "1", "hop_s": "2"}, "must not exceed"),
                           ({"granularity": "frame"}, "unknown parameters"),
                           ({"labels": "a," * 600}, "labels")]:
        with pytest.raises(protocol.StreamError, match=message) as bad:
            protocol.parse_params(query, settings)
        assert bad.value.close_code == 1008, query
    with pytest.raises(ValueError, match="stream_hop_s"):
        RouterSettings(stream_window_s=1.0, stream_hop_s=2.0)


def test_window_schedule_rounds_to_samples_and_accounts_for_skips():
    schedule = protocol.WindowSchedule(22_050, window_s=1.0, hop_s=0.25)
    # hop_s * rate = 5512.5 samples: ends are rounded half up, each from k * hop, not summed.
    assert [schedule.end_sample(k) for k in range(1, 6)] == [5513, 11025, 16538, 22050, 27563]
    assert schedule.windows_in(5512) == 0 and schedule.windows_in(27563) == 5
    schedule.advance(5512, now=1.0)
    assert schedule.take() is None
    schedule.advance(5513, now=2.0)
    first = schedule.take()
    assert (first.index, first.start, first.end, first.skipped, first.due_at) == (1, 0, 5513, 0,
                                                                                    2.0)
    assert (first.start_s, first.end_s) == (0.0, round(5513 / 22_050, 6))
    schedule.advance(27563, now=3.0)  # windows 2..5 due at once: the newest runs
    newest = schedule.take()
    assert (newest.index, newest.start, newest.end, newest.skipped) == (5, 27563 - 22050,
                                                                         27563, 3)
    assert schedule.take() is None
    schedule.drop(newest)  # refused by the variant: reported with the next window
    schedule.advance(33075, now=4.0)
    after = schedule.take()
    assert (after.index, after.skipped) == (6, 4) and schedule.carried == 0
    # Every window is either sent (first, after) or reported as skipped by a sent one.
    assert 2 + first.skipped + after.skipped == 6


def test_session_limit_follows_the_proxy_timeout_and_its_header():
    assert protocol.session_limit_s(55, None, {}) == 55
    assert protocol.session_limit_s(55, 60, {}) == 55
    assert protocol.session_limit_s(55, 30, {}) == 29  # one second before the proxy drops it
    header = "x-request-timeout-seconds"
    assert protocol.session_limit_s(55, 60, {header: "10"}) == 9
    assert protocol.session_limit_s(55, 30, {header: "0"}) == 55  # the client disabled it
    assert protocol.session_limit_s(55, 30, {header: "soon"}) == 29  # ignored, as Ray does


def test_api_errors_map_to_close_codes():
    for status, code, close_code in [(400, "unknown_model_version", 1008),
                                     (422, "invalid_audio", 1008), (503, "overloaded", 1013),
                                     (503, "model_unavailable", 1013),
                                     (504, "model_timeout", 1013), (500, "bug", 1011)]:
        error = protocol.StreamError.from_api(ApiError(status, code, "x"))
        assert (error.close_code, error.code) == (close_code, code)
        assert error.event() == {"type": "error", "error": {"code": code, "message": "x"}}
    # Over a key's quota: try later, and when (the Retry-After the API would send).
    error = protocol.StreamError.from_api(ApiError(429, "rate_limited", "x",
                                                   headers={"Retry-After": "3"}))
    assert error.close_code == 1013
    assert error.event()["error"] == {"code": "rate_limited", "message": "x", "retry_after_s": 3}


def test_sample_buffer_grows_and_slices():
    buffer = protocol.SampleBuffer()
    chunks = [np.arange(n, dtype=np.float32) for n in (10_000, 30_000, 7)]
    for chunk in chunks:
        buffer.append(chunk)
    everything = np.concatenate(chunks)
    assert len(buffer) == len(everything)
    assert np.array_equal(buffer.slice(0, len(buffer) + 5), everything)
    assert np.array_equal(buffer.slice(9_990, 10_010), everything[9_990:10_010])


# -- through the proxy ------------------------------------------------------------------------
def stream_url(base_url: str, **params) -> str:
    return "ws" + base_url[len("http"):] + "/v1/stream" + (
        "?" + urlencode(params) if params else "")


def next_event(ws: ClientConnection, timeout: float = 60) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def close_code(ws: ClientConnection, timeout: float = 60) -> int | None:
    """Wait for the server's close; its code (None: dropped without a close frame)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None
    raise AssertionError("the server did not close the stream")


@contextmanager
def open_stream(base_url: str, headers: dict | None = None, **params):
    """A connected stream to the service at base_url, with its ready event."""
    with connect(stream_url(base_url, **params), additional_headers=headers or {},
                 open_timeout=60, close_timeout=10, max_size=2**24) as ws:
        ready = next_event(ws)
        assert ready["type"] == "ready", ready
        yield ws, ready


def refused(base_url: str, *messages, headers: dict | None = None,
            **params) -> tuple[dict, int]:
    """Send these messages; the error event and close code that follow."""
    with connect(stream_url(base_url, **params), additional_headers=headers or {},
                 open_timeout=60) as ws:
        for message in messages:
            try:
                ws.send(message)
            except ConnectionClosed:
                break
        event = next_event(ws)
        while event["type"] != "error":
            event = next_event(ws)
        return event, close_code(ws)


def lockstep(ws: ClientConnection, raw: np.ndarray, rate: int, hop_s: float) -> list[dict]:
    """Send the audio up to each window's end, waiting for that window's event before the
    next (as fast as the service answers, so none is skipped); then the rest and `end`.
    The window events, then the result."""
    schedule = protocol.WindowSchedule(rate, 1.0, hop_s)
    events, sent = [], 0
    for k in range(1, schedule.windows_in(len(raw)) + 1):
        end = schedule.end_sample(k)
        ws.send(raw[sent:end].tobytes())
        sent = end
        events.append(next_event(ws))
        assert events[-1]["type"] == "window", events[-1]
    if sent < len(raw):
        ws.send(raw[sent:].tobytes())
    ws.send(json.dumps({"type": "end"}))
    events.append(next_event(ws))
    return events


def predicted(client, samples: np.ndarray, rate: int, variant: str) -> dict:
    response = client.post("/v1/predict", files={"file": ("w.wav", wav_bytes(samples, rate))},
                           data={"model_version": variant})
    assert response.status_code == 200, response.text
    return response.json()


def assert_scores_equal(got: dict, expected: dict) -> None:
    assert list(got["scores"]) == EMOTIONS
    np.testing.assert_allclose(list(got["scores"].values()), list(expected["scores"].values()),
                               atol=TOLERANCE, rtol=0)
    assert got["emotion"] == max(got["scores"], key=got["scores"].get)
    assert got["confidence"] == got["scores"][got["emotion"]]


def check_parity(client, events: list[dict], raw: np.ndarray, rate: int, variant: str,
                 window_s: float, hop_s: float) -> None:
    *windows, result = events
    assert len(windows) == math.floor(len(raw) / (hop_s * rate) + 1e-9)
    for k, window in enumerate(windows, start=1):
        end = round(window["end_s"] * rate)
        start = round(window["start_s"] * rate)
        assert end == int(k * hop_s * rate + 0.5) and start == max(0, end - round(window_s * rate))
        assert window["skipped"] == 0
        assert_scores_equal(window, predicted(client, raw[start:end], rate, variant))
    assert result["type"] == "result" and result["model_version"] == variant
    whole = predicted(client, raw, rate, variant)
    assert_scores_equal(result, whole)
    for key in ("label", "model", "granularity"):
        assert result[key] == whole[key], key
    assert result["audio"]["duration_s"] == whole["audio"]["duration_s"]
    assert result["audio"]["sample_rate"] == rate and result["audio"]["channels"] == 1
    assert (result["windows"], result["skipped"]) == (len(windows), 0)


def test_ready_event_and_version_resolution(service):
    headers = {"x-request-id": "live-0001"}
    with open_stream(service.url, headers) as (ws, ready):
        assert ready == {
            "type": "ready", "request_id": "live-0001", "model_version": "large",
            "routed_by": None, "sample_rate": 16_000, "encoding": "pcm_s16le", "window_s": 2.0,
            "hop_s": 0.5,
            "limits": {"max_stream_s": 30.0, "max_session_s": 55.0, "idle_timeout_s": 10.0,
                       "max_message_bytes": 1_048_576}}  # max_stream_s: tiny's max_duration_s
        ws.send(json.dumps({"type": "end"}))
        assert next_event(ws)["error"]["code"] == "empty_audio"
        assert close_code(ws) == 1008
    with open_stream(service.url, model_version="fast", api_key="accepted-unchecked",
                     sample_rate=8000, encoding="f32le", window_s=1, hop_s=1) as (_, ready):
        assert (ready["model_version"], ready["sample_rate"], ready["encoding"]) == (
            "turbo", 8000, "f32le")
        assert (ready["window_s"], ready["hop_s"]) == (1.0, 1.0)
        assert ready["limits"]["max_stream_s"] == 30.0
        assert ready["request_id"] and ready["request_id"] != "live-0001"  # Serve's own id


def test_windows_and_result_equal_predict_at_16k(service, client):
    raw = as_int16(tone(3.2, 16_000, 200.0, 11))
    with open_stream(service.url) as (ws, ready):
        events = lockstep(ws, raw, 16_000, ready["hop_s"])
        assert close_code(ws) == 1000
    assert [w["end_s"] for w in events[:-1]] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert [w["start_s"] for w in events[:-1]] == [0.0, 0.0, 0.0, 0.0, 0.5, 1.0]
    check_parity(client, events, raw, 16_000, "large", 2.0, 0.5)


def test_windows_and_result_equal_predict_when_resampled(service, client):
    """22.05 kHz float32: every window resampled on its own, hops of 5512.5 samples."""
    raw = tone(1.7, 22_050, 260.0, 12)
    with open_stream(service.url, model_version="base", sample_rate=22_050, encoding="f32le",
                     window_s=1.0, hop_s=0.25) as (ws, _ready):
        events = lockstep(ws, raw, 22_050, 0.25)
        assert close_code(ws) == 1000
    assert [w["end_s"] for w in events[:-1]] == [round(e / 22_050, 6) for e in
                                                 (5513, 11025, 16538, 22050, 27563, 33075)]
    check_parity(client, events, raw, 22_050, "base", 1.0, 0.25)


def test_real_time_windows_arrive_after_their_audio_without_skips(service):
    raw, chunk = as_int16(tone(2.6, 16_000, 210.0, 13)), 1_600  # 0.1 s per message
    arrivals: list[tuple[dict, float]] = []
    with open_stream(service.url, model_version="base") as (ws, _):
        began = time.monotonic()
        for index, offset in enumerate(range(0, len(raw), chunk)):
            ws.send(raw[offset:offset + chunk].tobytes())
            # Real-time pace; read what has arrived meanwhile.
            while (wait := began + (index + 1) * 0.1 - time.monotonic()) > 0:
                try:
                    arrivals.append((json.loads(ws.recv(timeout=wait)), time.monotonic()))
                except TimeoutError:
                    break
        ws.send(json.dumps({"type": "end"}))
        while not arrivals or arrivals[-1][0]["type"] != "result":
            arrivals.append((next_event(ws), time.monotonic()))
    *windows, (result, _) = arrivals
    assert [event["end_s"] for event, _ in windows] == [0.5, 1.0, 1.5, 2.0, 2.5]
    for event, arrived in windows:
        assert event["type"] == "window" and event["skipped"] == 0
        # Never before its last sample was sent (that left at end_s - 0.1 s).
        assert arrived - began >= event["end_s"] - 0.1
    assert result["type"] == "result" and result["audio"]["duration_s"] == 2.6


def test_the_client_streams_at_real_time_pace(service):
    """serve_app.tools.stream_client (the CLI's and the benchmark's): 1.5 s of audio takes 1.5 s."""
    from serve_app.tools.stream_client import stream_audio

    began = time.monotonic()
    run = asyncio.run(stream_audio(service.url, tone(1.5, 16_000), 16_000, pace="realtime",
                                   encoding="pcm_s16le", params={"model_version": "base"}))
    assert time.monotonic() - began >= 1.5
    assert [w["end_s"] for w in run.windows] == [0.5, 1.0, 1.5] and run.skipped == 0
    assert all(w["lag_ms"] >= 0 for w in run.windows)
    assert run.result["audio"]["duration_s"] == 1.5 and run.close_code == 1000


def test_audio_faster_than_the_model_skips_to_the_newest_window(service, client):
    raw = as_int16(tone(8.0, 16_000, 190.0, 14))
    with open_stream(service.url, model_version="base") as (ws, _):
        ws.send(raw.tobytes())  # 16 windows due at once
        ws.send(json.dumps({"type": "end"}))
        events = [next_event(ws), next_event(ws)]
        assert close_code(ws) == 1000
    window, result = events
    assert (window["start_s"], window["end_s"], window["skipped"]) == (6.0, 8.0, 15)
    assert_scores_equal(window, predicted(client, raw[6 * 16_000:], 16_000, "base"))
    assert (result["windows"], result["skipped"]) == (1, 15)
    assert_scores_equal(result, predicted(client, raw, 16_000, "base"))


@pytest.mark.parametrize("params, code", [
    ({"model_version": "nope"}, "unknown_model_version"),
    ({"sample_rate": "abc"}, "invalid_parameter"),
    ({"sample_rate": "200000"}, "invalid_parameter"),
    ({"encoding": "opus"}, "invalid_parameter"),
    ({"window_s": "0.1"}, "invalid_parameter"),
    ({"window_s": "1", "hop_s": "1.5"}, "invalid_parameter"),
    ({"granularity": "frame"}, "unknown_field"),
    ({"model_version": "base", "labels": "happy,bored"}, "unknown_label"),  # before any audio
])
def test_bad_parameters_are_refused_with_1008(service, params, code):
    event, closed = refused(service.url, **params)
    assert event["error"]["code"] == code and event["error"]["message"]
    assert closed == 1008


@pytest.mark.parametrize("messages, params, code", [
    ([b"\x01\x02\x03"], {}, "invalid_pcm"),
    ([b"\x00" * 6], {"encoding": "f32le"}, "invalid_pcm"),
    ([np.array([0.0, np.nan], "<f4").tobytes()], {"encoding": "f32le"}, "invalid_samples"),
    (["hello"], {}, "invalid_message"),
    ([json.dumps({"type": "stop"})], {}, "invalid_message"),
    ([b"\x00\x00" * 800, json.dumps({"type": "end"})], {}, "audio_too_short"),
])
def test_bad_input_is_refused_with_1008(service, messages, params, code):
    event, closed = refused(service.url, *messages, **params)
    assert event["error"]["code"] == code and closed == 1008


def test_metrics_count_streams_and_a_dropped_stream_leaves_none_open(service):
    turbo = {"application": APP_NAME, "variant": "turbo"}  # summed over the router's replicas

    def streams_open(count: int, keep_alive=None) -> Scrape:
        scraped = scrape(service.cluster.metrics_url)
        active = scraped.samples("ray_emotion2vec_streams_active", **turbo)
        if not active or sum(active.values()) != count:
            if keep_alive:
                keep_alive()
            raise AssertionError(f"turbo streams open: {active or 'no sample'}")
        return scraped

    raw = as_int16(tone(1.2, 16_000)).tobytes()
    with open_stream(service.url, model_version="turbo", window_s=0.5,
                     hop_s=0.25) as (ws, _):
        ws.send(raw)
        eventually(lambda: streams_open(1, keep_alive=lambda: ws.send(b"\x00\x00" * 16)),
                   "one turbo stream open", 60, interval_s=1)
        drop(ws)
    scraped = eventually(lambda: streams_open(0), "no turbo stream open after the drop", 60,
                         interval_s=1)
    assert scraped.total("ray_emotion2vec_stream_audio_seconds_total", **turbo) >= 1.2
    assert scraped.total("ray_emotion2vec_stream_event_lag_ms_count", **turbo) >= 1


# -- limits: the session app's router, reconfigured in place for these tests ----------------
def reconfigure_router(service, **overrides) -> None:
    """Put the session app with these Router settings; wait until a new stream sees them."""
    app = service.app
    deployments = [{**d, "user_config": {**d["user_config"], **overrides}}
                   if d["name"] == "Router" else d for d in app["deployments"]]
    service.cluster.put({**app, "deployments": deployments})
    want = overrides.get("stream_idle_timeout_s", 10.0)

    def taken() -> bool:
        with open_stream(service.url) as (_, ready):
            return ready["limits"]["idle_timeout_s"] == want

    eventually(taken, f"a new stream's idle timeout {want} s (the router took the settings)", 60)


@pytest.fixture(scope="module")
def tight(service):
    """Small stream limits (idle 0.8 s marks them applied); the usual ones again after."""
    limits = {"stream_max_s": 2.0, "stream_max_session_s": 2.5, "stream_idle_timeout_s": 0.8,
              "stream_max_message_bytes": 4096, "max_streams": 2}
    reconfigure_router(service, **limits)
    yield limits
    reconfigure_router(service)


def test_a_message_over_the_limit_closes_with_1009(service, tight):
    event, closed = refused(service.url, b"\x00" * 4098)
    assert event["error"]["code"] == "message_too_large" and closed == 1009


def test_a_stream_over_max_stream_s_is_refused(service, tight):
    chunks = [b"\x00\x01" * 2000] * 17  # 0.125 s each: 2.125 s
    event, closed = refused(service.url, *chunks, model_version="base", window_s=2, hop_s=2)
    assert event["error"]["code"] == "stream_too_long" and closed == 1008
    assert "2 s" in event["error"]["message"]


def test_a_silent_stream_times_out(service, tight):
    with open_stream(service.url) as (ws, _ready):
        began = time.monotonic()
        ws.send(b"\x00\x00" * 160)
        event = next_event(ws)
        assert event["error"]["code"] == "idle_timeout" and close_code(ws) == 1008
        assert time.monotonic() - began >= 0.7


def test_a_session_ends_before_its_wall_clock_limit_and_the_proxy_timeout(service, tight):
    """The stream keeps sending (never idle) but lasts too long; the proxy's per-request
    timeout header shortens the session to one second before the proxy would drop it."""
    for headers, limit in [({}, 2.5), ({"x-request-timeout-seconds": "2.2"}, 1.2)]:
        began, event = time.monotonic(), None  # the session starts once the router has it
        with open_stream(service.url, headers) as (ws, ready):
            assert ready["limits"]["max_session_s"] == limit
            for _ in range(40):
                ws.send(b"\x00\x00" * 16)
                try:
                    event = json.loads(ws.recv(timeout=0.2))
                    break
                except TimeoutError:
                    pass
                except ConnectionClosed:
                    break
            assert event and event["error"]["code"] == "session_timeout", event
            assert close_code(ws) == 1008
            assert limit <= time.monotonic() - began <= limit + 3


def drop(ws: ClientConnection) -> None:
    """Vanish without a close handshake, as a crashed client does."""
    ws.socket.shutdown(socket.SHUT_RDWR)
    ws.socket.close()


def open_both(service) -> list[ClientConnection]:
    """Two streams at once, both ready (retried while earlier ones are still closing)."""

    def both_ready() -> list[ClientConnection] | None:
        held = [connect(stream_url(service.url, model_version="base", window_s=0.5,
                                   hop_s=0.1), open_timeout=60) for _ in range(2)]
        if all(next_event(ws)["type"] == "ready" for ws in held):
            return held
        for ws in held:
            ws.close()
        return None

    # an error (a refused handshake) fails at once, as the streams it opened are not closed
    return eventually(both_ready, "two streams ready (the dropped ones' slots freed)", 30,
                      interval_s=0.2, retry_on=())


def test_streams_over_the_cap_get_1013_and_dropped_ones_free_their_slot(service, tight):
    audio_bytes = as_int16(tone(0.125, 16_000)).tobytes()
    for _ in range(2):
        held = open_both(service)
        for ws in held:
            ws.send(audio_bytes)  # a window is due: it runs when the client drops
        event, closed = refused(service.url)
        assert event["error"]["code"] == "too_many_streams" and closed == 1013
        for ws in held:
            drop(ws)
    for ws in open_both(service):  # both slots free again
        ws.close()


def test_a_variant_too_slow_for_the_stream_closes_with_1013(service, tight):
    """model_timeout_s 0.05 s (the variant client waits at least 0.1 s): the tiny model
    needs longer for 20-28 s of audio (about 0.25 s here, less once its caches are warm)."""
    reconfigure_router(service, stream_idle_timeout_s=9.0, model_timeout_s=0.05)
    try:
        raw = as_int16(tone(28.0, 16_000)).tobytes()
        for _ in range(5):
            with open_stream(service.url, model_version="base", window_s=30,
                             hop_s=10) as (ws, _):
                ws.send(raw)
                ws.send(json.dumps({"type": "end"}))
                events = [next_event(ws)]
                while events[-1]["type"] == "window":
                    events.append(next_event(ws))
                closed = close_code(ws)
            if events[-1]["type"] == "error":
                break
            assert events[-1]["type"] == "result" and closed == 1000  # it was fast enough
        assert events[-1]["error"]["code"] == "model_timeout" and closed == 1013
    finally:
        reconfigure_router(service, **tight)
