"""Hostile input, backpressure, timeouts, a dying replica, logs and metrics, on the real
cluster. Every hostile request gets a 4xx JSON error and the service keeps serving."""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import signal
import struct
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.audio import sndfile
from serve_app.errors import ApiError
from tests.test_lifecycle import Client, make_app, tiny
from tests.traffic import Traffic, post_clip
from tests.waiting import eventually, wait_for_metrics


def encode(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def tone(seconds: float, rate: int = 16_000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return mono if channels == 1 else np.repeat(mono[:, None], channels, axis=1)


def forged_rate_wav(rate: int) -> bytes:
    data = bytearray(encode(tone(0.5), 16_000, subtype="PCM_16"))
    data[24:28] = struct.pack("<I", rate)  # fmt chunk: sample rate
    return bytes(data)


def forged_frames_wav() -> bytes:
    data = bytearray(encode(tone(0.5), 16_000, subtype="PCM_16"))
    data[40:44] = struct.pack("<I", 0xFFFFFFF0)  # data chunk size: claims ~37 hours
    return bytes(data)


def audio_bomb_flac() -> bytes:
    # 20 minutes of silence compress to a few kB: refused from the header, never decoded.
    return encode(np.zeros(20 * 60 * 8_000, np.float32), 8_000, "FLAC")


HOSTILE = {
    # name: (body, status, error code)
    "zero_length": (b"", 422, "empty_audio"),
    "one_sample": (encode(np.zeros(1, np.float32), 16_000), 422, "audio_too_short"),
    "nan_samples": (encode(np.full(16_000, np.nan, np.float32), 16_000, subtype="FLOAT"), 422,
                    "invalid_samples"),
    "inf_samples": (encode(np.full(16_000, np.inf, np.float32), 16_000, subtype="FLOAT"), 422,
                    "invalid_samples"),
    "audio_bomb": (audio_bomb_flac(), 413, "audio_too_long"),
    "forged_rate_huge": (forged_rate_wav(4_000_000_000), 415, "unsupported_audio"),
    "forged_rate_tiny": (forged_rate_wav(500), 422, "unsupported_sample_rate"),
    "text": (b"hello, I am definitely a wav file" * 20, 415, "unsupported_audio"),
    "truncated_header": (encode(tone(1.0), 16_000)[:30], 415, "unsupported_audio"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_bodies_get_a_4xx_and_the_service_keeps_serving(client, clips, name):
    body, status, code = HOSTILE[name]
    response = client.post("/v1/predict", files={"file": ("x.wav", body)})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert client.post("/v1/predict", files={"file": ("ok.wav", clips["tone_16k_mono_wav"]
                                                       .read_bytes())}).status_code == 200


@pytest.mark.parametrize("body,channels", [
    (encode(tone(1.0, 16_000, 8), 16_000), 8),
    (encode(tone(1.0, 22_050), 22_050, subtype="PCM_24"), 1),
    (encode(tone(1.0, 44_100), 44_100, subtype="FLOAT"), 1),
    (encode(tone(1.0, 8_000), 8_000, subtype="DOUBLE"), 1),
    (encode(tone(2.0), 16_000)[:40_000], 1),  # truncated mid-data: what is there is used
])
def test_unusual_but_valid_audio_is_served(client, body, channels):
    response = client.post("/v1/predict", files={"file": ("a.mp3", body)})  # wrong extension
    assert response.status_code == 200, response.text
    assert response.json()["audio"]["channels"] == channels


def test_forged_frame_count_is_refused_or_read_within_limits(client):
    response = client.post("/v1/predict", files={"file": ("x.wav", forged_frames_wav())})
    assert response.status_code in (200, 413), response.text
    if response.status_code == 413:
        assert response.json()["error"]["code"] == "audio_too_long"


def test_wrong_content_type_and_form_abuse(client, clips):
    wav = clips["tone_16k_mono_wav"].read_bytes()
    raw = client.post("/v1/predict", content=wav, headers={"content-type": "text/plain"})
    assert raw.status_code == 200
    huge_field = client.post("/v1/predict", files={"file": ("a.wav", wav)},
                             data={"model_version": "x" * 200_000})
    assert huge_field.status_code in (400, 413)
    assert huge_field.json()["error"]["code"] in ("malformed_form", "payload_too_large")
    two_files = client.post("/v1/predict", files=[("file", ("a.wav", wav)),
                                                  ("file", ("b.wav", wav))])
    assert two_files.status_code == 400
    assert client.post("/v1/predict", files={"file": ("a.wav", wav)}).status_code == 200


def test_oversized_body_is_refused_before_it_is_read_whole(service):
    """A chunked body with no Content-Length: the 413 arrives while the client is still
    sending, long before the 64 MB it offers (the cap is 2 MB)."""
    import select
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(service.url)
    chunk = b"\0" * (256 * 1024)
    sent, answer = 0, b""
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: audio/wav\r\nTransfer-Encoding: chunked\r\n\r\n")
        deadline = time.monotonic() + 60
        while sent < 64 * 2**20 and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 5)
            if readable:
                answer = sock.recv(65536)
                break
            if writable:
                try:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                except OSError:
                    break  # the server closed the connection: a refusal too
                sent += len(chunk)
        sock.settimeout(10)
        while b"}}" not in answer:  # the JSON error body may come in a later packet
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"payload_too_large" in answer
    assert sent < 64 * 2**20, sent  # refused before the whole body was taken


@settings(max_examples=150)  # the rest from the profile (tests/conftest.py)
@given(st.binary(max_size=4096))
def test_fuzz_decoder_on_random_bytes(data):
    _decode_or_4xx(data)


_SEEDS = [encode(tone(0.5), 16_000), encode(tone(0.5, 8_000), 8_000, "FLAC"),
          encode(tone(0.5, 22_050), 22_050, "OGG", "VORBIS"),
          encode(tone(0.5, 16_000, 2), 16_000, subtype="PCM_24")]


@settings(max_examples=250)
@given(st.sampled_from(_SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                         max_size=12), st.integers(0, 12_000))
def test_fuzz_decoder_on_mutated_files(seed, flips, cut):
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    _decode_or_4xx(bytes(data[: max(1, len(data) - cut)]))


def _decode_or_4xx(data: bytes) -> None:
    try:
        decoded = sndfile.decode(data, max_duration_s=30, min_duration_s=0.1)
    except ApiError as exc:
        assert 400 <= exc.status < 500
        return
    assert decoded.waveform.dtype == np.float32 and decoded.waveform.ndim == 1
    assert np.isfinite(decoded.waveform).all()


@pytest.fixture(scope="module")
def tight(cluster, tmp_path_factory):
    """An app whose base variant takes one request at a time and queues one more."""
    root = tmp_path_factory.mktemp("tight")
    app = make_app(root, name="tight", prefix="/tight", variants=("base",),
                   router={"default_version": "base", "model_timeout_s": 1.5,
                           "max_duration_s": 120, "max_upload_bytes": 8 * 2**20},
                   base=tiny(root, 3))
    for deployment in app["deployments"]:
        if deployment["name"] == "base":
            deployment.update(max_ongoing_requests=1, max_queued_requests=1)
    cluster.put(app)
    assert cluster.wait_for("tight", ("RUNNING", "DEPLOY_FAILED")).status == "RUNNING"
    yield Client(cluster.url, "/tight")
    cluster.remove("tight")


def _hf(clip: Path):
    return lambda http, _s, _n: http.post("/v1/audio-classification/base",
                                          content=clip.read_bytes())


def _v2(clip: Path):
    body = {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(clip.read_bytes()).decode()]}]}
    return lambda http, _s, _n: http.post("/v2/models/base/infer", json=body)


def _error_code(body: dict) -> str:
    """The service's `{"error": {"code"}}`, or KServe's `{"error": "code: message"}`."""
    error = body["error"]
    return error["code"] if isinstance(error, dict) else error.split(":")[0]


# Every protocol is an adapter over the same admission: each says 503 the same way.
@pytest.mark.parametrize("request_for", [post_clip, _hf, _v2], ids=["predict", "hf", "v2"])
def test_overload_answers_503_with_retry_after(tight, cluster, tmp_path, request_for):
    clip = tmp_path / "25s.wav"
    soundfile.write(clip, tone(25.0), 16_000)  # ~0.5 s of inference on the tiny model
    # Eight requests at once, one each.
    with Traffic(cluster.url + "/tight", request_for(clip), senders=8, per_sender=1) as traffic:
        traffic.join()
    codes = sorted(o.status for o in traffic.outcomes)
    assert len(codes) == 8 and set(codes) <= {200, 503, 504}, [str(o) for o in traffic.outcomes]
    assert 200 in codes and 503 in codes, codes
    for outcome in traffic.outcomes:
        if outcome.status == 503:
            assert outcome.retry_after
            assert _error_code(json.loads(outcome.value)) == "overloaded"
    assert tight.predict(clip).status_code == 200  # and it recovers


def test_slow_model_answers_504(tight, cluster, tmp_path):
    clip = tmp_path / "60s.wav"
    soundfile.write(clip, tone(60.0), 16_000)  # over a second on the tiny model
    app = cluster.apps["tight"]
    router = next(d for d in app["deployments"] if d["name"] == "Router")
    short_timeout = {**router["user_config"], "model_timeout_s": 0.25}
    cluster.put({**app, "deployments": [
        {**d, "user_config": short_timeout} if d is router else d for d in app["deployments"]]})
    try:
        def timed_out() -> httpx.Response:
            response = tight.predict(clip)
            assert response.status_code != 200, response.json()["timings_ms"]
            return response

        # the router takes the new limit live
        response = eventually(timed_out, "the short model timeout taken", 30, interval_s=0)
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "model_timeout"
    finally:  # the usual timeout again, and seen: a 25 s clip is answered in time
        cluster.put(app)
        short = tmp_path / "25s.wav"
        soundfile.write(short, tone(25.0), 16_000)
        eventually(lambda: tight.predict(short).status_code == 200,
                   "the usual model timeout back (a 25 s clip answered)", 30, interval_s=0)


def test_killed_replica_is_replaced_and_no_request_hangs(cluster, tmp_path_factory, clips):
    root = tmp_path_factory.mktemp("fault")
    app = make_app(root, name="fault", prefix="/fault", variants=("base",), base=tiny(root, 4))
    cluster.put(app)
    try:
        assert cluster.wait_for("fault", ("RUNNING", "DEPLOY_FAILED")).status == "RUNNING"
        client = Client(cluster.url, "/fault")
        victim = client.variant("base")["pid"]
        clip = tmp_path_factory.mktemp("fault-clips") / "20s.wav"
        soundfile.write(clip, tone(20.0), 16_000)
        # A hang ends at the client's timeout, as a transport error: a failure.
        with Traffic(cluster.url + "/fault", post_clip(clip), senders=3, per_sender=500,
                     max_s=90) as traffic:
            traffic.wait_for(3)
            os.kill(victim, signal.SIGKILL)  # a process of this test's own cluster
            replaced = client.wait("base", lambda i: i.get("pid") not in (None, victim)
                                   and i["state"] == "ready", timeout_s=90)
            time.sleep(1.0)
        counts = traffic.counts()
        assert set(counts) <= {200, 503}, counts
        assert counts.get(200, 0) >= 3
        assert replaced["load_count"] == 1
        health = client.http.get("/health").json()
        assert health["variants"]["base"] == "ready"
        assert client.predict(clips["tone_16k_mono_wav"]).status_code == 200
    finally:
        cluster.remove("fault")


def test_results_folder_cannot_be_escaped(client, clips, service):
    response = client.post("/v1/predict", files={"file": ("a.wav",
                                                         clips["tone_16k_mono_wav"].read_bytes())},
                           headers={"x-request-id": "../../escape"})
    assert response.status_code == 200
    request_id = response.json()["request_id"]
    assert "/" not in request_id and ".." not in request_id
    assert (service.results_dir / request_id / "result.json").exists()
    assert not (service.results_dir.parent.parent / "escape").exists()


def test_one_access_log_line_per_request(client, clips, service):
    request_id = "trace-me-0042"
    client.post("/v1/predict", files={"file": ("a.wav", clips["tone_16k_mono_wav"].read_bytes())},
                data={"model_version": "fast"}, headers={"x-request-id": request_id})
    client.post("/v1/predict", files={"file": ("a.wav", b"junk")},
                headers={"x-request-id": request_id + "-bad"})
    pattern = os.path.join(service.cluster.temp_dir, "session_latest", "logs", "serve",
                           "replica_emotion2vec_Router_*.log")

    def logged() -> list[dict]:
        lines = [json.loads(line[line.index("{"):]) for path in glob.glob(pattern)
                 for line in Path(path).read_text().splitlines()
                 if f'"request_id": "{request_id}' in line]
        assert len(lines) >= 2, lines
        return lines

    lines = eventually(logged, "both requests in the router's log", 30, interval_s=0.5)
    by_id = {line["request_id"]: line for line in lines}
    ok, bad = by_id[request_id], by_id[request_id + "-bad"]
    assert (ok["variant"], ok["status"]) == ("turbo", 200)
    assert ok["total_ms"] >= ok["model_ms"] > 0 and ok["audio_s"] == 2.0
    assert (bad["status"], bad["code"]) == (415, "unsupported_audio")


def test_metrics_reach_the_prometheus_endpoint(client, clips, service):
    for variant in ("base", "large"):
        assert client.post("/v1/predict", files={"file": ("a.wav", clips["tone_16k_mono_wav"]
                                                           .read_bytes())},
                           data={"model_version": variant}).status_code == 200
    client.post("/v1/predict", files={"file": ("a.wav", b"junk")})
    base_ok = {"application": service.app["name"], "variant": "base", "outcome": "2xx"}
    scraped = wait_for_metrics(
        service.cluster.metrics_url,
        ("ray_emotion2vec_requests_total", base_ok),
        ("ray_emotion2vec_requests_total", {"outcome": "4xx"}),
        *((f"ray_emotion2vec_{name}", {}) for name in (
            "inference_latency_ms_bucket", "audio_seconds_total", "model_loads_total",
            "model_loaded", "queue_length", "request_latency_ms_bucket", "batch_size_bucket")))
    assert scraped.total("ray_emotion2vec_requests_total", **base_ok) >= 1


def test_a_replica_whose_model_breaks_reports_unhealthy(cluster, tmp_path_factory, clips):
    """The model's files vanish while it is idle-released: the reload fails, the request gets
    a clear 503, check_health turns the replica unhealthy and /v1/models says failed."""
    import shutil

    from ray import serve

    from serve_app.checkpoints import generate

    root = tmp_path_factory.mktemp("breaks")
    directory = generate.write_checkpoint(root / "tiny", "tiny", 6)
    app = make_app(root, name="breaks", prefix="/breaks", variants=("base",),
                   base={"source": str(directory), "generate": None, "idle_unload_s": 1.0})
    cluster.put(app)
    try:
        assert cluster.wait_for("breaks", ("RUNNING", "DEPLOY_FAILED")).status == "RUNNING"
        client = Client(cluster.url, "/breaks")
        client.wait("base", lambda i: i["state"] == "unloaded", timeout_s=60)
        shutil.rmtree(directory)
        response = client.predict(clips["tone_16k_mono_wav"])
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "model_error"
        eventually(lambda: serve.status().applications["breaks"].deployments["base"].status in (
            "UNHEALTHY", "DEPLOY_FAILED"), "base reported unhealthy", 90, interval_s=1)
        assert client.variant("base")["state"] == "failed"
    finally:
        cluster.remove("breaks")
