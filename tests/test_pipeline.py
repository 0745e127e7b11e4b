"""The request pipeline on its own (serve_app/api/pipeline.py): real access control, routing,
decoding, limits and shadow, with a stand-in for the variant deployments, and no cluster.
Whatever happens to a request, it writes one access-log line and one set of metrics."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging

import numpy as np
import pytest
import soundfile
from starlette.responses import JSONResponse

from serve_app.api.pipeline import Pipeline
from serve_app.config import RouterSettings
from serve_app.errors import AccessDenied, ApiError
from serve_app.wire import (
    TARGET_SR,
    Granularity,
    InferenceOptions,
    ModelDescription,
    Timings,
    VariantAnswer,
)

LABELS = ["生气/angry", "开心/happy", "中立/neutral", "难过/sad"]
KEY = "k-alpha-0123456789"


class Variants:
    """Stands in for serve_app.api.variant_client.Variants: answers at once, keeps requests."""

    def __init__(self, names=("base", "large")):
        self.names = list(names)
        self.calls: list[tuple[str, object]] = []

    async def predict(self, variant, request, timeout_s) -> VariantAnswer:
        self.calls.append((variant, request))
        return VariantAnswer(LABELS, [0.1, 0.6, 0.2, 0.1],
                             model=ModelDescription(variant, "/m/" + variant, "random",
                                                    "float32", "cpu"),
                             timings=Timings(queue_ms=0.5, inference_ms=2.0))


class Metrics:
    """Records what the pipeline reports to serve_app.metrics.RouterMetrics."""

    def __init__(self) -> None:
        self.records: list[tuple] = []
        self.accesses: list[tuple[str, str]] = []
        self.audio: list[tuple[str, float]] = []

    def record(self, variant, status, latency_ms, audio_s, route=None) -> None:
        self.records.append((variant, status, audio_s, route))

    def access(self, key: str, outcome: str) -> None:
        self.accesses.append((key, outcome))

    def key_file_state(self, state: str) -> None:
        pass

    def key_audio(self, key: str, seconds: float) -> None:
        self.audio.append((key, seconds))

    def shadow(self, *args) -> None:
        pass


class Connection:
    def __init__(self, **headers: str):
        self.headers = {name.replace("_", "-"): value for name, value in headers.items()}


class AccessLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture
def log():
    logger = logging.getLogger("ray.serve.emotion2vec.access")
    handler, level = AccessLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def wav(seconds: float, rate: int = TARGET_SR) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate,
                    format="WAV")
    return buffer.getvalue()


def pipeline(**settings) -> tuple[Pipeline, Variants, Metrics]:
    variants, metrics = Variants(), Metrics()
    fields = {"default_version": "base", "decode_workers": 0, **settings}
    built = Pipeline(variants, metrics, RouterSettings(**fields))
    asyncio.run(built.configure(RouterSettings(**fields)))
    return built, variants, metrics


async def predict(pipe: Pipeline, data: bytes, connection: Connection,
                  model_version: str | None = None) -> JSONResponse:
    """POST /v1/predict's steps, as the Router runs them."""
    async with pipe.request(connection) as call:
        route = call.resolve(model_version, connection.headers.get("x-session-key"))
        decoded = await call.decode(data)
        answer = await call.infer(route, decoded.waveform, InferenceOptions())
        return call.respond(JSONResponse({"scores": answer.scores,
                                          "timings_ms": call.timings_ms(answer)}))


def test_a_served_request_logs_one_line_and_records_once(log):
    pipe, variants, metrics = pipeline(aliases={"latest": "large"})
    response = asyncio.run(predict(pipe, wav(1.5), Connection(x_request_id="req-1"), "latest"))
    assert response.status_code == 200
    ((variant, request),) = variants.calls
    assert variant == "large" and request.options.granularity == Granularity.UTTERANCE
    assert request.waveform.dtype == np.float32 and len(request.waveform) == 24_000
    (line,) = log
    assert (line["request_id"], line["key"], line["variant"], line["route"], line["status"]) \
        == ("req-1", "anonymous", "large", "latest", 200)
    assert line["audio_s"] == 1.5 and line["model_ms"] >= 0 and line["total_ms"] >= 0
    assert metrics.records == [("large", 200, 1.5, "latest")]
    assert metrics.accesses == [("anonymous", "admitted")]


@pytest.mark.parametrize("data, model_version, status, code", [
    (b"junk", None, 415, "unsupported_audio"),
    (wav(0.05), None, 422, "audio_too_short"),
    (wav(3.0), None, 413, "audio_too_long"),
    (wav(1.0), "nope", 400, "unknown_model_version"),
])
def test_a_refused_request_logs_one_line_with_its_code(log, data, model_version, status, code):
    pipe, variants, metrics = pipeline(max_duration_s=2.0)
    with pytest.raises(ApiError) as caught:
        asyncio.run(predict(pipe, data, Connection(), model_version))
    assert (caught.value.status, caught.value.code) == (status, code)
    (line,) = log
    assert (line["status"], line["code"]) == (status, code)
    assert len(metrics.records) == 1 and metrics.records[0][1] == status
    assert variants.calls == []  # refused before it cost a model slot


def test_keys_and_quotas_are_checked_first_and_audio_is_charged(log):
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    pipe, _, metrics = pipeline(api_keys={
        "alpha": {"sha256": digest, "requests_per_minute": 60,
                  "audio_seconds_per_minute": 120}})
    with pytest.raises(AccessDenied) as caught:
        asyncio.run(predict(pipe, wav(1.0), Connection()))
    assert caught.value.status == 401
    response = asyncio.run(predict(pipe, wav(1.0), Connection(authorization=f"Bearer {KEY}")))
    assert response.status_code == 200 and response.headers["x-ratelimit-limit"]
    assert [(line["key"], line["status"]) for line in log] == [("invalid", 401),
                                                                ("alpha", 200)]
    assert metrics.accesses == [("invalid", "unauthorized"), ("alpha", "admitted")]
    assert metrics.audio == [("alpha", 1.0)]
    assert [record[1] for record in metrics.records] == [401, 200]


def test_a_bug_inside_a_route_is_logged_as_500_once(log):
    pipe, _, metrics = pipeline()

    async def broken() -> None:
        async with pipe.request(Connection()) as call:
            call.resolve(None)
            raise KeyError("a bug")

    with pytest.raises(KeyError):
        asyncio.run(broken())
    assert [line["status"] for line in log] == [500] and metrics.records[0][:2] == ("base", 500)


def test_decoded_samples_take_the_same_limits_downmix_and_resampling(log):
    pipe, variants, _ = pipeline(max_duration_s=2.0)
    rate = 8_000
    t = np.arange(rate) / rate
    left = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    stereo = np.stack([left, -left], axis=1)  # opposite phases: the downmix is silence

    async def send(samples: np.ndarray, sample_rate: int) -> VariantAnswer:
        async with pipe.request(Connection()) as call:
            route = call.resolve(None)
            accepted = await call.accept(samples, sample_rate)
            assert (accepted.sample_rate, accepted.channels) == (sample_rate, samples.ndim)
            return await call.infer(route, accepted.waveform,
                                    InferenceOptions(Granularity.FRAME, True))

    asyncio.run(send(stereo, rate))
    (_, request), = variants.calls
    assert len(request.waveform) == TARGET_SR and np.abs(request.waveform).max() < 1e-3
    assert request.options == InferenceOptions(Granularity.FRAME, True)
    pcm = (left * 32767).astype(np.int16)  # int16, read as libsndfile reads 16-bit PCM
    asyncio.run(send(pcm, TARGET_SR))
    np.testing.assert_allclose(variants.calls[-1][1].waveform, pcm / 32768, atol=1e-7)
    for samples, code in [(np.zeros((3, 2, 2), np.float32), "invalid_waveform"),
                          (np.zeros(rate * 3, np.float32), "audio_too_long"),
                          (np.array([0.0, np.nan] * 800, np.float32), "invalid_samples"),
                          (np.zeros(800, np.int64), "invalid_waveform")]:
        with pytest.raises(ApiError) as caught:
            asyncio.run(send(samples, rate))
        assert caught.value.code == code
    assert [line["status"] for line in log] == [200, 200, 422, 413, 422, 422]
