"""The protocol adapters' wire formats, without a server: requests built by the real clients'
own code (huggingface_hub's request builder, tritonclient's request serialiser) are parsed here,
and responses encoded here are read back by tritonclient's InferResult and huggingface_hub's
output type."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from huggingface_hub.inference._generated.types import AudioClassificationOutputElement
from huggingface_hub.inference._providers import get_provider_helper
from tritonclient.http import InferInput, InferRequestedOutput, InferResult
from tritonclient.http._utils import _get_inference_request
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from serve_app.api import hf, kserve_codec
from serve_app.api.kserve_codec import (
    encode_infer_response,
    model_input,
    model_outputs,
    parse_infer_request,
)
from serve_app.errors import ApiError

URL = "http://127.0.0.1:8000/v1/audio-classification/base"
AUDIO = b"RIFF\x00\x01fake wav bytes \xff\xfe" * 10
LIMIT = 4096


def hf_request(top_k=None, function_to_apply=None, token=None):
    """What InferenceClient(model=URL).audio_classification(AUDIO, ...) would POST."""
    helper = get_provider_helper("hf-inference", task="audio-classification", model=URL)
    request = helper.prepare_request(
        inputs=AUDIO, parameters={"function_to_apply": function_to_apply, "top_k": top_k},
        headers={}, model=URL, api_key=token)
    assert request.url == URL and request.json is None
    return request.data, request.headers


def test_hf_raw_body():
    body, headers = hf_request(token="secret")
    assert headers["authorization"] == "Bearer secret"
    parsed = hf.parse_request(body, headers.get("content-type"), {}, LIMIT)
    assert parsed == hf.HfRequest(AUDIO)


def test_hf_json_body_with_parameters_and_labels():
    body, headers = hf_request(top_k=3, function_to_apply="sigmoid")
    parsed = hf.parse_request(body, headers.get("content-type"), {"labels": "Sad,happy"}, LIMIT)
    assert parsed == hf.HfRequest(AUDIO, 3, "sigmoid", ("sad", "happy"))
    document = {"inputs": "data:audio/wav;base64," + base64.b64encode(AUDIO).decode(),
                "parameters": {"labels": ["angry", "neutral"], "top_k": "2"}}
    parsed = hf.parse_request(json.dumps(document).encode(), "application/json; charset=utf-8",
                              {}, LIMIT)
    assert (parsed.audio, parsed.top_k, parsed.labels) == (AUDIO, 2, ("angry", "neutral"))


@pytest.mark.parametrize("body, content_type, query, status, code", [
    (b"x" * (LIMIT + 1), "audio/wav", {}, 413, "payload_too_large"),
    (b"{}", "application/json", {}, 422, "missing_file"),
    (b'{"inputs": "not base64!"}', "application/json", {}, 422, "invalid_base64"),
    (json.dumps({"inputs": base64.b64encode(b"x" * (LIMIT + 1)).decode()}).encode(),
     "application/json", {}, 413, "payload_too_large"),
    (b"{not json", "application/json", {}, 400, "malformed_json"),
    (b"[1]", "application/json", {}, 422, "invalid_request"),
    (b'{"inputs": "AAAA", "options": {}}', "application/json", {}, 422, "unknown_field"),
    (b'{"inputs": "AAAA", "parameters": {"temperature": 1}}', "application/json", {}, 422,
     "unknown_field"),
    (b'{"inputs": "AAAA", "parameters": {"top_k": 1}}', "application/json", {"top_k": "2"},
     422, "invalid_parameter"),
    (AUDIO, None, {"model_version": "base"}, 422, "unknown_field"),
    (AUDIO, None, {"top_k": "0"}, 422, "invalid_parameter"),
    (AUDIO, None, {"top_k": "two"}, 422, "invalid_parameter"),
    (b'{"inputs": "AAAA", "parameters": {"top_k": true}}', "application/json", {}, 422,
     "invalid_parameter"),
    (AUDIO, None, {"function_to_apply": "relu"}, 422, "invalid_parameter"),
])
def test_hf_refusals(body, content_type, query, status, code):
    with pytest.raises(ApiError) as caught:
        hf.parse_request(body, content_type, query, LIMIT)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_hf_answer_orders_cuts_and_transforms():
    labels = ["生气/angry", "开心/happy", "中立/neutral", "<unk>"]
    scores, logits = [0.1, 0.5, 0.1, 0.3], [-1.0, 2.0, -1.0, 1.0]
    answer = hf.classification(labels, scores, logits)
    assert [(e["label"], e["score"]) for e in answer] == [
        ("happy", 0.5), ("unknown", 0.3), ("angry", 0.1), ("neutral", 0.1)]  # ties: head order
    parsed = AudioClassificationOutputElement.parse_obj_as_list(json.dumps(answer).encode())
    assert [e.label for e in parsed] == ["happy", "unknown", "angry", "neutral"]
    assert [e["label"] for e in hf.classification(labels, scores, logits, top_k=2)] == [
        "happy", "unknown"]
    assert hf.classification(labels, scores, logits, "none", 1) == [{"label": "happy",
                                                                      "score": 2.0}]
    sigmoid = hf.classification(labels, scores, logits, "sigmoid")
    assert [e["score"] for e in sigmoid] == pytest.approx(
        [1 / (1 + np.exp(-x)) for x in (2.0, 1.0, -1.0, -1.0)], abs=1e-7)
    assert hf.classification(labels, scores, [-1e4, 0, 0, 0], "sigmoid")[-1]["score"] == 0.0


# -- KServe v2 --------------------------------------------------------------------------------
def triton_request(inputs, outputs=None, parameters=None):
    """tritonclient.http's own serialisation of an infer request: (body, header length)."""
    body, json_size = _get_inference_request(inputs, "", outputs, 0, False, False, 0, None,
                                             parameters)
    return body, None if json_size is None else str(json_size)


def audio_input(binary: bool) -> InferInput:
    tensor = InferInput("audio", [1], "BYTES")
    element = AUDIO if binary else base64.b64encode(AUDIO)
    tensor.set_data_from_numpy(np.array([element], dtype=object), binary_data=binary)
    return tensor


@pytest.mark.parametrize("binary", [True, False])
def test_v2_audio_input_binary_and_json(binary):
    body, header = triton_request([audio_input(binary)], parameters={"labels": "sad,happy",
                                                                     "granularity": "frame"})
    assert (header is not None) == binary
    request = parse_infer_request(body, header)
    assert model_input(request, LIMIT).audio == AUDIO
    assert request.parameters["labels"] == "sad,happy"
    assert request.parameters["granularity"] == "frame"
    # No outputs named: the defaults, binary (tritonclient asks so with binary_data_output).
    assert request.outputs == {"scores": True, "labels": True, "emotion": True}


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("shape", [[3_000], [1, 3_000]])
def test_v2_waveform_input(binary, shape):
    samples = np.random.default_rng(0).standard_normal(3_000).astype(np.float32)
    tensor = InferInput("waveform", shape, "FP32")
    tensor.set_data_from_numpy(samples.reshape(shape), binary_data=binary)
    outputs = [InferRequestedOutput("embedding", binary_data=False),
               InferRequestedOutput("scores", binary_data=True)]
    request = parse_infer_request(*triton_request([tensor], outputs))
    np.testing.assert_array_equal(model_input(request, LIMIT).waveform, samples)
    assert request.outputs == {"embedding": False, "scores": True}
    nested = {"inputs": [{"name": "waveform", "datatype": "FP32", "shape": [1, 3],
                          "data": [[0.5, -0.25, 1.0]]}]}
    request = parse_infer_request(json.dumps(nested).encode(), None)
    assert model_input(request, LIMIT).waveform.tolist() == [0.5, -0.25, 1.0]


def raw_request(inputs: list[dict], binary: bytes = b"", **extra) -> tuple[bytes, str | None]:
    header = json.dumps({"inputs": inputs, **extra}).encode()
    return header + binary, str(len(header)) if binary else None


AUDIO_JSON = {"name": "audio", "datatype": "BYTES", "shape": [1],
              "data": [base64.b64encode(AUDIO).decode()]}
FP32_2 = {"name": "waveform", "datatype": "FP32", "shape": [2],
          "parameters": {"binary_data_size": 8}}


@pytest.mark.parametrize("body, header, code", [
    (b"{", None, "malformed_json"),
    (b"[" * 100_000 + b"]" * 100_000, None, "malformed_json"),
    (b'{"inputs": {}}', None, "invalid_tensor"),
    (b'{"inputs": []}', "99", "invalid_tensor"),                  # header longer than the body
    (b'{"inputs": []}', "x", "invalid_tensor"),
    (*raw_request([FP32_2], b"\0" * 12), "invalid_tensor"),       # 4 bytes belong to no input
    (*raw_request([FP32_2], b"\0" * 4), "invalid_tensor"),        # runs past the body
    (*raw_request([{**FP32_2, "parameters": {"binary_data_size": 4}}], b"\0" * 4),
     "invalid_tensor"),                                           # 4 bytes for 2 floats
    (*raw_request([{"name": "waveform", "datatype": "FP32", "shape": [3], "data": [1, 2]}]),
     "invalid_tensor"),
    (*raw_request([{"name": "waveform", "datatype": "FP32", "shape": [1],
                    "data": ["a"]}]), "invalid_tensor"),
    (*raw_request([{"name": "waveform", "datatype": "FP32", "shape": [-1], "data": []}]),
     "invalid_tensor"),
    (*raw_request([{"name": "waveform", "datatype": "FP32", "shape": [2 ** 40], "data": []}]),
     "invalid_tensor"),
    (*raw_request([{"name": "waveform", "datatype": "INT16", "shape": [1], "data": [1]}]),
     "invalid_tensor"),
    (*raw_request([{"name": "audio", "datatype": "BYTES", "shape": [1],
                    "parameters": {"binary_data_size": 6}}], b"\x09\0\0\0ab"), "invalid_tensor"),
    (*raw_request([AUDIO_JSON, AUDIO_JSON]), "invalid_tensor"),
    (*raw_request([AUDIO_JSON], parameters={"temperature": 1}), "unknown_parameter"),
    (*raw_request([AUDIO_JSON], outputs=[{"name": "logits"}]), "unknown_output"),
    (*raw_request([AUDIO_JSON], outputs=[{"name": "scores",
                                          "parameters": {"classification": 2}}]),
     "unsupported_parameter"),
    (*raw_request([{**AUDIO_JSON, "parameters": {"shared_memory_region": "r"}}]),
     "unsupported_parameter"),
    (*raw_request([{**AUDIO_JSON, "parameters": [1]}]), "invalid_tensor"),
])
def test_v2_malformed_requests(body, header, code):
    with pytest.raises(ApiError) as caught:
        parse_infer_request(body, header)
    assert (caught.value.status, caught.value.code) == (400, code)


@pytest.mark.parametrize("inputs, status, code", [
    ([AUDIO_JSON, {**AUDIO_JSON, "name": "waveform", "datatype": "FP32", "data": [0.0]}],
     400, "invalid_tensor"),                                                    # two inputs
    ([{**AUDIO_JSON, "name": "file"}], 400, "invalid_tensor"),
    ([{**AUDIO_JSON, "datatype": "FP32", "data": [1.0]}], 400, "invalid_tensor"),
    ([{**AUDIO_JSON, "shape": [2], "data": ["AAAA", "AAAA"]}], 400, "invalid_tensor"),
    ([{**AUDIO_JSON, "data": ["not base64!"]}], 400, "invalid_base64"),
    ([{**AUDIO_JSON, "data": [base64.b64encode(b"x" * (LIMIT + 1)).decode()]}], 413,
     "payload_too_large"),
    ([{"name": "waveform", "datatype": "FP32", "shape": [2, 2], "data": [0, 0, 0, 0]}], 400,
     "invalid_tensor"),
])
def test_v2_model_input_refusals(inputs, status, code):
    request = parse_infer_request(*raw_request(inputs))
    with pytest.raises(ApiError) as caught:
        model_input(request, LIMIT)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_bytes_tensors_match_tritonclient():
    elements = [b"", b"happy", "生气".encode(), b"\0\xff" * 300]
    ours = kserve_codec.join_bytes(elements)
    assert ours == serialize_byte_tensor(np.array(elements, dtype=object)).item()
    assert kserve_codec.split_bytes(ours, 4, "x") == elements
    assert list(deserialize_bytes_tensor(ours)) == elements


@pytest.mark.parametrize("granularity_frames", [None, 1, 7])
def test_v2_response_read_back_by_tritonclient(granularity_frames):
    labels, scores = ["angry", "happy", "sad"], [0.25, 0.5, 0.25]
    embedding = (None if granularity_frames is None else
                 np.arange(granularity_frames * 4, dtype=np.float32).reshape(-1, 4))
    if granularity_frames == 1:
        embedding = embedding[0]  # an utterance embedding is (D,): sent as [1, D]
    outputs = model_outputs(labels, scores, "happy", embedding)
    wanted = {"emotion": True, "scores": False, "labels": True}
    if embedding is not None:
        wanted["embedding"] = granularity_frames == 7
    body, headers = encode_infer_response("base", "0123456789ab", "req-1", outputs, wanted)
    length = headers.get(kserve_codec.HEADER_LENGTH)
    assert headers["content-type"] == kserve_codec.BINARY_CONTENT_TYPE
    result = InferResult.from_response_body(body, header_length=int(length))
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == list(wanted)
    assert (response["model_name"], response["model_version"], response["id"]) == (
        "base", "0123456789ab", "req-1")
    np.testing.assert_array_equal(result.as_numpy("scores"), np.float32(scores))
    assert result.as_numpy("labels").tolist() == [b"angry", b"happy", b"sad"]
    assert result.as_numpy("emotion").tolist() == [b"happy"]
    if embedding is not None:
        np.testing.assert_array_equal(result.as_numpy("embedding"),
                                      np.reshape(embedding, (-1, 4)))
    # All JSON: no header length, plain JSON that tritonclient reads too.
    body, headers = encode_infer_response("base", None, None, outputs,
                                          dict.fromkeys(wanted, False))
    assert headers == {"content-type": "application/json"}
    result = InferResult.from_response_body(body)
    assert result.as_numpy("labels").tolist() == ["angry", "happy", "sad"]
    assert "model_version" not in result.get_response()


def test_v2_documents():
    metadata = kserve_codec.model_metadata("large", ["0123456789ab"], 1024)
    assert [i["name"] for i in metadata["inputs"]] == ["audio", "waveform"]
    assert {o["name"]: o["shape"] for o in metadata["outputs"]}["embedding"] == [-1, 1024]
    assert kserve_codec.model_version("ab" * 32) == "ab" * 6
    assert kserve_codec.model_version(None) is None
    error = ApiError(429, "quota_exceeded", "over the quota", headers={"Retry-After": "3"})
    assert kserve_codec.error_body(error) == {"error": "quota_exceeded: over the quota"}
    assert kserve_codec.body_limit(True, 1000, 1.0, 5000) == 64_000 + kserve_codec.HEADER_OVERHEAD
    assert kserve_codec.body_limit(False, 3000, 1.0, 10) == 4000 + kserve_codec.HEADER_OVERHEAD

