"""The protocols against the live test app: Hugging Face's InferenceClient and tritonclient.http,
unmodified, and plain HTTP for each error; label sets on predict, the stream, both protocols and
/v1/models. Results equal predict's on the same audio."""

from __future__ import annotations

import base64
import json
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import soundfile
import tritonclient.http as triton
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from tritonclient.utils import InferenceServerException

from tests.clips import tone
from tests.test_stream import as_int16, close_code, lockstep, open_stream

TOLERANCE = 1e-5
FOUR = "angry,happy,neutral,sad"
EMOTIONS = ["angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised",
            "unknown"]


def predict(client, clip, **fields) -> dict:
    response = client.post("/v1/predict", files={"file": (clip.name, clip.read_bytes())},
                           data={k: str(v) for k, v in fields.items()})
    assert response.status_code == 200, response.text
    return response.json()


def triton_client(url: str, **kwargs) -> triton.InferenceServerClient:
    parts = urlsplit(url)
    return triton.InferenceServerClient(parts.netloc + parts.path, **kwargs)


def audio_input(clip, binary: bool = True) -> triton.InferInput:
    """The file's bytes; in JSON, where BYTES elements are text, its base64."""
    data = clip.read_bytes() if binary else base64.b64encode(clip.read_bytes()).decode()
    tensor = triton.InferInput("audio", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=object), binary_data=binary)
    return tensor


def text(element) -> str:
    """A BYTES element as tritonclient gives it: bytes when binary, str from JSON."""
    return element.decode() if isinstance(element, bytes) else element


def outputs(*names: str, binary: bool = True) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(name, binary_data=binary) for name in names]


def as_scores(result) -> dict[str, float]:
    labels = [text(label) for label in result.as_numpy("labels")]
    return dict(zip(labels, result.as_numpy("scores").tolist()))


def assert_close(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    np.testing.assert_allclose(list(got.values()), list(expected.values()), atol=TOLERANCE,
                               rtol=0)


# -- Hugging Face audio-classification ---------------------------------------------------------
def test_hf_client_raw_and_top_k_equal_predict(service, client, clips):
    clip = clips["tone_16k_mono_wav"]
    for version, variant in ((None, "large"), ("base", "base"), ("fast", "turbo")):
        url = service.url + "/v1/audio-classification" + (f"/{version}" if version else "")
        hf = InferenceClient(model=url)
        expected = predict(client, clip, model_version=variant)["scores"]
        got = hf.audio_classification(clip.read_bytes())  # no parameters: the raw body
        assert [e.label for e in got] == sorted(expected, key=lambda n: -expected[n])
        assert_close({e.label: e.score for e in got}, {e.label: expected[e.label] for e in got})
        top = hf.audio_classification(str(clip), top_k=3)  # JSON with base64 inputs
        assert [(e.label, e.score) for e in top] == [(e.label, e.score) for e in got[:3]]


def test_hf_functions_come_from_the_logits(service, client, clips):
    clip = clips["tone_5s_16k_wav"]
    hf = InferenceClient(model=service.url + "/v1/audio-classification/base")
    softmax = {e.label: e.score for e in hf.audio_classification(clip.read_bytes())}
    logits = {e.label: e.score for e in
              hf.audio_classification(clip.read_bytes(), function_to_apply="none")}
    sigmoid = {e.label: e.score for e in
               hf.audio_classification(clip.read_bytes(), function_to_apply="sigmoid")}
    names = sorted(logits)
    raw = np.array([logits[n] for n in names], np.float64)
    np.testing.assert_allclose([softmax[n] for n in names], np.exp(raw) / np.exp(raw).sum(),
                               atol=TOLERANCE)
    np.testing.assert_allclose([sigmoid[n] for n in names], 1 / (1 + np.exp(-raw)),
                               atol=TOLERANCE)


def test_hf_label_subset_equals_predict(service, client, clips):
    clip = clips["stereo_44k_flac"]
    expected = predict(client, clip, model_version="base", labels=FOUR)["scores"]
    assert list(expected) == FOUR.split(",")
    response = httpx.post(service.url + "/v1/audio-classification/base",
                          params={"labels": FOUR}, content=clip.read_bytes(), timeout=60)
    assert response.status_code == 200, response.text
    got = {e["label"]: e["score"] for e in response.json()}
    assert_close({n: got[n] for n in expected}, expected)
    # In the JSON body's parameters, with top_k and logits of the subset only.
    body = {"inputs": base64.b64encode(clip.read_bytes()).decode(),
            "parameters": {"labels": FOUR, "top_k": 2, "function_to_apply": "none"}}
    response = httpx.post(service.url + "/v1/audio-classification/base", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()) == 2 and {e["label"] for e in response.json()} <= set(expected)


def test_hf_with_a_key(keyed, clips):
    clip = clips["tone_16k_mono_wav"]
    url = keyed.url + "/v1/audio-classification"
    got = InferenceClient(model=url, token=keyed.keys["alpha"]).audio_classification(
        clip.read_bytes(), top_k=2)
    assert len(got) == 2 and got[0].score >= got[1].score
    with pytest.raises(HfHubHTTPError) as refused:
        InferenceClient(model=url).audio_classification(clip.read_bytes())
    assert refused.value.response.status_code == 401


@pytest.mark.parametrize("path, params, body, status, code", [
    ("/v1/audio-classification/nope", {}, "clip", 400, "unknown_model_version"),
    ("/v1/audio-classification", {"labels": "happy,bored"}, "clip", 400, "unknown_label"),
    ("/v1/audio-classification", {"top_k": "0"}, "clip", 422, "invalid_parameter"),
    ("/v1/audio-classification", {}, b"not audio at all" * 10, 415, None),
    ("/v1/audio-classification", {}, b"\0" * (2 * 1024 * 1024 + 1), 413, "payload_too_large"),
])
def test_hf_errors_keep_the_services_shape(service, clips, path, params, body, status, code):
    content = clips["tone_16k_mono_wav"].read_bytes() if body == "clip" else body
    response = httpx.post(service.url + path, params=params, content=content, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert code is None or error["code"] == code
    if code == "unknown_label":
        assert error["valid"] == EMOTIONS


# -- KServe Open Inference Protocol v2 ---------------------------------------------------------
def test_v2_probes_and_metadata(service, client):
    kserve = triton_client(service.url)
    assert kserve.is_server_live() and kserve.is_server_ready()
    assert kserve.get_server_metadata()["name"] == "emotion2vec-serve"
    variants = client.get("/v1/models").json()["variants"]
    base = variants["base"]
    assert base["labels"] == EMOTIONS and base["sample_rate"] == 16_000
    assert base["embedding_dim"] == 64 and base["parameter_count"] > 0
    assert len(base["sha256"]) == 64
    metadata = kserve.get_model_metadata("base")
    assert metadata["versions"] == [base["sha256"][:12]]
    assert {i["name"] for i in metadata["inputs"]} == {"audio", "waveform"}
    assert metadata["outputs"][-1] == {"name": "embedding", "datatype": "FP32", "shape": [-1, 64]}
    assert kserve.is_model_ready("base") and kserve.is_model_ready("latest")
    assert kserve.is_model_ready("base", base["sha256"][:12])
    assert not kserve.is_model_ready("base", "0" * 12)
    # large and turbo share a checkpoint: the alias fast has turbo's one version.
    assert kserve.get_model_metadata("fast")["versions"] == [variants["turbo"]["sha256"][:12]]


@pytest.mark.parametrize("binary", [True, False])
def test_v2_audio_input_equals_predict(service, client, clips, binary):
    clip = clips["stereo_44k_flac"]
    expected = predict(client, clip, model_version="large", extract_embedding="true")
    result = triton_client(service.url).infer(
        "latest", [audio_input(clip, binary)],
        outputs=outputs("scores", "labels", "emotion", "embedding", binary=binary))
    assert_close(as_scores(result), expected["scores"])
    assert text(result.as_numpy("emotion")[0]) == expected["emotion"]
    np.testing.assert_allclose(result.as_numpy("embedding"), [expected["embedding"]],
                               atol=TOLERANCE)
    assert result.get_response()["model_name"] == "latest"


@pytest.mark.parametrize("binary", [True, False])
def test_v2_waveform_input_equals_predict(service, client, clips, binary):
    clip = clips["tone_16k_mono_wav"]
    samples, rate = soundfile.read(clip, dtype="float32")
    assert rate == 16_000
    expected = predict(client, clip, model_version="base", labels=FOUR)
    waveform = triton.InferInput("waveform", [1, len(samples)], "FP32")
    waveform.set_data_from_numpy(samples[None, :], binary_data=binary)
    kserve = triton_client(service.url)
    version = kserve.get_model_metadata("base")["versions"][0]
    result = kserve.infer("base", [waveform], model_version=version,
                          parameters={"labels": FOUR}, outputs=outputs(
                              "scores", "labels", "emotion", binary=binary))
    assert_close(as_scores(result), expected["scores"])
    assert result.get_response()["model_version"] == version


def test_v2_label_subset_and_json_request(service, client, clips):
    clip = clips["noise_22k_ogg"]
    expected = predict(client, clip, model_version="base", labels="sad,happy")["scores"]
    body = {"id": "req-1", "parameters": {"labels": "sad,happy"},
            "inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(clip.read_bytes()).decode()]}]}
    response = httpx.post(service.url + "/v2/models/base/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["id"] == "req-1" and document["model_name"] == "base"
    tensors = {t["name"]: t for t in document["outputs"]}
    assert tensors["labels"]["data"] == ["happy", "sad"] and tensors["scores"]["shape"] == [2]
    assert_close(dict(zip(tensors["labels"]["data"], tensors["scores"]["data"])), expected)


def test_v2_with_a_key(keyed, clips):
    headers = {"Authorization": f"Bearer {keyed.keys['alpha']}"}
    kserve = triton_client(keyed.url)
    result = kserve.infer("base", [audio_input(clips["tone_16k_mono_wav"])], headers=headers)
    assert len(result.as_numpy("scores")) == 9
    with pytest.raises(InferenceServerException) as refused:
        kserve.infer("base", [audio_input(clips["tone_16k_mono_wav"])])
    assert refused.value.status() == "401"
    # Probes stay open; model routes need the key.
    for path in ("/v2", "/v2/health/live", "/v2/health/ready"):
        assert httpx.get(keyed.url + path, timeout=30).status_code == 200, path
    for path in ("/v2/models/base", "/v2/models/base/ready"):
        response = httpx.get(keyed.url + path, timeout=30)
        assert response.status_code == 401 and "unauthorized" in response.json()["error"]


def test_v2_quota_is_the_keys(keyed):
    headers = {"X-API-Key": keyed.keys["protocols"]}
    statuses = [httpx.get(keyed.url + "/v2/models/base", headers=headers, timeout=30)
                for _ in range(3)]
    assert statuses[0].status_code == 200
    over = statuses[-1]
    assert over.status_code == 429 and over.headers["retry-after"]
    assert over.json()["error"].startswith("rate_limited: ")


def v2_infer(url: str, body: bytes | dict, headers: dict | None = None) -> httpx.Response:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return httpx.post(url, content=body, headers={"content-type": "application/json",
                                                  **(headers or {})}, timeout=60)


def audio_json(data: bytes, **extra) -> dict:
    return {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(data).decode()]}], **extra}


@pytest.mark.parametrize("path, body, status, code", [
    ("/v2/models/nope/infer", "clip", 404, "unknown_model"),
    ("/v2/models/base/versions/000000000000/infer", "clip", 404, "unknown_model_version"),
    ("/v2/models/base/infer", b"{not json", 400, "malformed_json"),
    ("/v2/models/base/infer", {"inputs": [{"name": "audio", "datatype": "FP32", "shape": [1],
                                           "data": [1.0]}]}, 400, "invalid_tensor"),
    ("/v2/models/base/infer", {"inputs": []}, 400, "invalid_tensor"),
    ("/v2/models/base/infer", ("clip", {"parameters": {"labels": "happy,bored"}}), 400,
     "unknown_label"),
    ("/v2/models/base/infer", ("clip", {"parameters": {"granularity": "word"}}), 422,
     "invalid_granularity"),
    ("/v2/models/base/infer", {"inputs": [{"name": "waveform", "datatype": "FP32",
                                           "shape": [100], "data": [0.0] * 100}]}, 422,
     "audio_too_short"),
    ("/v2/models/base/infer", "too large", 413, "payload_too_large"),
    ("/v2/models/base/infer", "json too large", 413, "payload_too_large"),
    ("/v2/models/base/infer", "garbage", 415, None),
])
def test_v2_errors_in_the_protocols_shape(service, clips, path, body, status, code):
    clip, headers = clips["tone_16k_mono_wav"].read_bytes(), {}
    if body == "too large":  # binary tensors: the upload cap (tiny's 2 MiB) and a header
        body, headers = b"{}" + b"\0" * (3 * 1024 * 1024), {"Inference-Header-Content-Length": "2"}
    elif body == "json too large":  # a JSON body past the JSON waveform cap (40 MiB default)
        body = b'{"inputs": [{"name": "waveform", "data": [' + b"0," * (21 * 1024 * 1024) + b"0]}]}"
    elif body == "clip":
        body = audio_json(clip)
    elif body == "garbage":
        body = audio_json(b"not audio at all" * 10)
    elif isinstance(body, tuple):
        body = audio_json(clip, **body[1])
    response = v2_infer(service.url + path, body, headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, str)
    assert code is None or error.startswith(code + ": "), error


def test_v2_metadata_errors(service):
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/base/versions/x",
                 "/v2/models/base/versions/x/ready"):
        response = httpx.get(service.url + path, timeout=30)
        assert response.status_code == 404, path
        assert isinstance(response.json()["error"], str)


# -- label sets on predict's other entries -----------------------------------------------------
def test_predict_timeline_and_stream_with_a_label_set(service, client, clips):
    body = predict(client, clips["tone_5s_16k_wav"], model_version="base", labels="sad,Angry",
                   granularity="frame")
    assert list(body["scores"]) == ["angry", "sad"]
    assert sum(body["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert all(list(w["scores"]) == ["angry", "sad"] for w in body["timeline"])
    response = client.post("/v1/predict", params={"labels": "joy"},
                           content=clips["tone_5s_16k_wav"].read_bytes())
    assert response.status_code == 400 and response.json()["error"]["code"] == "unknown_label"
    raw = as_int16(tone(1.2, 16_000, 200.0, 21))
    with open_stream(service.url, model_version="base", labels=FOUR, window_s=1,
                     hop_s=1) as (ws, _):
        events = lockstep(ws, raw, 16_000, 1.0)
        assert close_code(ws) == 1000
    assert all(list(e["scores"]) == FOUR.split(",") for e in events)
