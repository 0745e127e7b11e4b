"""The deployed service end to end, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from serve_app.audio import sndfile
from serve_app.errors import ApiError, InvalidInput
from serve_app.wire import InferenceRequest, VariantAnswer

EMOTIONS = ["angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised",
            "unknown"]
TINY_DIM = 64


def predict(client, path, **fields):
    with open(path, "rb") as handle:
        return client.post("/v1/predict", files={"file": (path.name, handle)},
                           data={k: str(v) for k, v in fields.items()})


def test_each_variant_and_alias_routes_to_its_own_model(client, clips):
    clip = clips["tone_16k_mono_wav"]
    answers = {}
    for version in ["base", "large", "turbo", "latest", "fast"]:
        response = predict(client, clip, model_version=version)
        assert response.status_code == 200, response.text
        answers[version] = response.json()
    assert {v: a["model_version"] for v, a in answers.items()} == {
        "base": "base", "large": "large", "turbo": "turbo", "latest": "large", "fast": "turbo"}
    assert all(a["model"]["variant"] == a["model_version"] for a in answers.values())
    # base and large are different checkpoints: their scores differ.
    assert answers["base"]["scores"] != answers["large"]["scores"]
    assert answers["latest"]["scores"] == answers["large"]["scores"]
    assert answers["turbo"]["model"]["dtype"] == "bfloat16"
    assert answers["large"]["model"]["dtype"] == "float32"


def test_default_version_is_large(client, clips):
    response = predict(client, clips["tone_16k_mono_wav"])
    assert response.status_code == 200
    assert response.json()["model_version"] == "large"


def test_response_schema(client, clips):
    response = predict(client, clips["stereo_44k_flac"], model_version="base")
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["x-request-id"] == body["request_id"]
    mine = client.post("/v1/predict", content=clips["tone_16k_mono_wav"].read_bytes(),
                       headers={"x-request-id": "client-id-42"})
    assert mine.json()["request_id"] == mine.headers["x-request-id"] == "client-id-42"
    assert list(body["scores"]) == EMOTIONS
    assert sum(body["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    best = max(body["scores"], key=body["scores"].get)
    assert body["emotion"] == best
    assert body["confidence"] == body["scores"][best]
    assert body["label"].endswith(best) or (best == "unknown" and body["label"] == "<unk>")
    assert body["granularity"] == "utterance"
    assert body["audio"] == {"duration_s": 1.5, "sample_rate": 44_100, "channels": 2,
                             "format": "FLAC"}
    assert body["model"] == {"variant": "base", "source": "tiny-seed1",  # its name, no path
                             "weights": "random", "dtype": "float32", "device": "cpu"}
    assert "embedding" not in body
    timings = body["timings_ms"]
    assert set(timings) == {"decode", "queue_and_inference", "inference", "total"}
    assert 0 < timings["inference"] <= timings["queue_and_inference"] <= timings["total"]


@pytest.mark.parametrize("name", ["tone_16k_mono_wav", "stereo_44k_flac", "noise_22k_ogg",
                                  "tone_48k_mp3", "tone_8k_24bit_wav"])
def test_formats_are_decoded(client, clips, name):
    response = predict(client, clips[name], model_version="base")
    assert response.status_code == 200, response.text
    info = response.json()["audio"]
    assert info["sample_rate"] == {"tone_16k_mono_wav": 16_000, "stereo_44k_flac": 44_100,
                                   "noise_22k_ogg": 22_050, "tone_48k_mp3": 48_000,
                                   "tone_8k_24bit_wav": 8_000}[name]


def test_raw_body_with_query_parameters(client, clips):
    data = clips["tone_16k_mono_wav"].read_bytes()
    response = client.post("/v1/predict?model_version=fast&granularity=frame"
                           "&extract_embedding=true", content=data,
                           headers={"content-type": "audio/wav"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "turbo"
    assert body["granularity"] == "frame"
    assert np.asarray(body["embedding"]).shape[1] == TINY_DIM


def test_embedding_shapes(client, clips):
    clip = clips["tone_16k_mono_wav"]  # 2 s: about 50 frames a second
    utterance = predict(client, clip, model_version="base", extract_embedding="true").json()
    frame = predict(client, clip, model_version="base", extract_embedding="true",
                    granularity="frame").json()
    assert np.asarray(utterance["embedding"]).shape == (TINY_DIM,)
    frames = np.asarray(frame["embedding"])
    assert frames.shape[1] == TINY_DIM and 95 <= frames.shape[0] <= 100
    np.testing.assert_allclose(frames.mean(axis=0), utterance["embedding"], atol=1e-5)
    # Scores are FunASR's: from mean-pooled features, whatever the granularity.
    assert frame["scores"] == pytest.approx(utterance["scores"], abs=1e-6)


def _parity_clips(clips):
    return [name for name in ["tone_5s_16k_wav", "stereo_44k_flac", "speech_en", "speech_slow"]
            if name in clips]


@pytest.mark.parametrize("variant", ["base", "large"])
@pytest.mark.parametrize("granularity", ["utterance", "frame"])
def test_parity_with_funasr_generate(client, clips, service, funasr_models, variant,
                                     granularity):
    """Scores and embeddings equal FunASR's AutoModel.generate on the same checkpoint."""
    model = funasr_models(service.checkpoints[variant])
    for name in _parity_clips(clips):
        decoded = sndfile.decode(clips[name].read_bytes(), max_duration_s=60, min_duration_s=0.1)
        expected = model.generate(decoded.waveform, granularity=granularity,
                                  extract_embedding=True)[0]
        response = predict(client, clips[name], model_version=variant, granularity=granularity,
                           extract_embedding="true")
        assert response.status_code == 200, response.text
        body = response.json()
        labels = expected["labels"]
        got_scores = [body["scores"][audio_name] for audio_name in
                      [("unknown" if lab == "<unk>" else lab.split("/")[-1]) for lab in labels]]
        np.testing.assert_allclose(got_scores, expected["scores"], atol=1e-5, rtol=0, err_msg=name)
        got = np.asarray(body["embedding"], dtype=np.float32)
        assert got.shape == expected["feats"].shape, name
        np.testing.assert_allclose(got, expected["feats"], atol=1e-5, rtol=0, err_msg=name)
        assert body["label"] == labels[int(np.argmax(expected["scores"]))]


def test_turbo_is_large_in_reduced_precision(client, clips, service, funasr_models):
    """Turbo's encoder runs in bf16 autocast: close to large fp32, equal to FunASR under the
    same autocast, and its float32 softmax still sums to 1."""
    import torch

    assert service.checkpoints["turbo"] == service.checkpoints["large"]
    model = funasr_models(service.checkpoints["large"])
    clip = clips["tone_5s_16k_wav"]
    decoded = sndfile.decode(clip.read_bytes(), max_duration_s=60, min_duration_s=0.1)
    fp32 = model.generate(decoded.waveform, extract_embedding=True)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.generate(decoded.waveform, extract_embedding=True)[0]
    body = predict(client, clip, model_version="turbo", extract_embedding="true").json()
    scores = np.array(list(body["scores"].values()))
    assert scores.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(body["embedding"], bf16["feats"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores, fp32["scores"], atol=0.02, rtol=0)
    assert not np.allclose(scores, fp32["scores"], atol=1e-7, rtol=0)  # really reduced


def _error(response, status, code):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


# Bad input, form by form, and the API description: tests/test_edge.py (in-process).


def test_a_variant_refusing_its_input_is_a_422_through_ray(service):
    """The variant's InvalidInput crosses Ray as RayTaskError.cause and is recognised by its
    class (serve_app.errors), whatever Ray wraps it in."""
    from ray import serve

    from serve_app.api.variant_client import Variants

    variants = Variants({"base": serve.get_deployment_handle("base", app_name="emotion2vec")})

    async def call(waveform: np.ndarray):
        return await variants.predict("base", InferenceRequest(waveform), timeout_s=60)

    for waveform, message in [(np.zeros(100, np.float32), "at least 400 samples"),
                              (np.zeros(16_000, np.float64), "1-D float32"),
                              (np.full(16_000, np.nan, np.float32), "NaN")]:
        with pytest.raises(ApiError) as caught:
            asyncio.run(call(waveform))
        assert (caught.value.status, caught.value.code) == (422, "invalid_audio")
        assert message in caught.value.message
    answer = asyncio.run(call(np.zeros(16_000, np.float32)))
    assert isinstance(answer, VariantAnswer) and len(answer.scores) == len(EMOTIONS)
    assert answer.model.variant == "base" and answer.timings.inference_ms > 0


def test_errors_are_told_apart_by_class_not_by_name():
    from ray.exceptions import RayTaskError

    from serve_app.api.variant_client import task_error

    class InvalidInput_(ValueError):  # another class: a name alone proves nothing
        pass

    InvalidInput_.__name__ = "InvalidInput"
    ours = RayTaskError("predict", "traceback", InvalidInput("too short")).as_instanceof_cause()
    theirs = RayTaskError("predict", "traceback", InvalidInput_("too short"))
    assert (task_error("base", ours).status, task_error("base", ours).code) == \
        (422, "invalid_audio")
    assert (task_error("base", theirs).status, task_error("base", theirs).code) == \
        (503, "model_error")


def audio_module_write(path, samples, rate):
    import soundfile

    soundfile.write(path, samples, rate, subtype="PCM_16", format="WAV")


def test_models_endpoint(client, service):
    response = client.get("/v1/models")
    body = response.json()
    # Local sources show as their directory's name: no server path in the answer.
    assert str(service.checkpoints["base"].parent) not in response.text
    assert {name: (info["source"], info["identity"]["source"])
            for name, info in body["variants"].items()} == {
        name: (service.checkpoints[name].name,) * 2 for name in body["variants"]}
    assert body["default_version"] == "large"
    assert body["aliases"] == {"latest": "large", "fast": "turbo"}
    assert set(body["variants"]) == {"base", "large", "turbo"}
    for _name, info in body["variants"].items():
        assert info["state"] == "ready"
        assert info["weights"] == "random"
        assert info["device"] == "cpu"
        assert info["load_count"] == 1
        assert info["load_s"] > 0
        assert info["threads"] == 1
    assert body["variants"]["turbo"]["dtype"] == "bfloat16"


def test_health_and_ready(client):
    from serve_app.api import failover

    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok",
                             "variants": {"base": "ready", "large": "ready", "turbo": "ready"},
                             "replay_middleware": failover.active()}
    assert client.get("/ready").status_code == 200
    assert client.get("/ready", params={"variant": "base"}).status_code == 200
    unknown = client.get("/ready", params={"variant": "nope"})
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "unknown_variant")


def test_no_model_load_on_the_request_path(client, clips):
    before = client.get("/v1/models").json()["variants"]
    for _ in range(8):
        for variant in ("base", "large", "turbo"):
            assert predict(client, clips["tone_16k_mono_wav"],
                           model_version=variant).status_code == 200
    after = client.get("/v1/models").json()["variants"]
    for variant in ("base", "large", "turbo"):
        assert after[variant]["load_count"] == 1
        assert after[variant]["pid"] == before[variant]["pid"]
        assert after[variant]["loaded_at"] == before[variant]["loaded_at"]


def test_results_are_saved_when_configured(client, clips, service):
    body = predict(client, clips["tone_16k_mono_wav"], model_version="base",
                   extract_embedding="true").json()
    folder = service.results_dir / body["request_id"]
    saved = json.loads((folder / "result.json").read_text())
    assert saved["scores"] == body["scores"]
    np.testing.assert_allclose(np.load(folder / "embedding.npy"), body["embedding"], atol=0)
    plain = predict(client, clips["tone_16k_mono_wav"], model_version="base").json()
    assert not (service.results_dir / plain["request_id"] / "embedding.npy").exists()
    assert (service.results_dir / plain["request_id"] / "result.json").exists()
    assert not [p for p in service.results_dir.iterdir() if p.name.startswith(".")]

