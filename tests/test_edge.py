"""The HTTP edge in this process, with no cluster: the service's whole FastAPI app (as the
Router builds it) over a request pipeline whose variants are real engines on a tiny generated
checkpoint (tests/inprocess.py), called with Starlette's TestClient. Its declared protocol
(the OpenAPI, generated from serve_app/api/protocol.py) is fuzzed with Schemathesis: no input
gets a 5xx other than a 503 with Retry-After, every answer matches its declared schema and
status codes, and the service still answers afterwards. What needs the cluster (deploys,
swaps, failover, metrics export, the real proxy) stays in the cluster tests."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import schemathesis
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import TypeAdapter
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.testclient import TestClient

from serve_app.api import protocol, protocol_v2
from serve_app.config import RouterSettings
from tests import inprocess

NAMES = ("base", "large")


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    """The app and its pipeline: variants base and large, an alias, small limits."""
    checkpoint = inprocess.tiny_checkpoint(tmp_path_factory.mktemp("checkpoints"))
    settings_ = RouterSettings(default_version="large", aliases={"fast": "base"},
                               decode_workers=0, max_upload_bytes=256 * 1024,
                               max_duration_s=10.0,
                               heads_dir=str(tmp_path_factory.mktemp("heads")))
    with inprocess.local_service(checkpoint, settings_, NAMES) as (_, app), \
            TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def api_schema(edge):
    return schemathesis.openapi.from_asgi("/openapi.json", edge.app)


def wav(seconds: float = 1.0, rate: int = 16_000, channels: int = 1) -> bytes:
    """A 220 Hz tone as a 16-bit WAV file."""
    t = np.arange(int(seconds * rate)) / rate
    samples = np.tile((0.3 * np.sin(2 * np.pi * 220 * t))[:, None], (1, channels))
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# -- the declared protocol --------------------------------------------------------------------
def test_predict_answers_as_declared(edge):
    answer = edge.post("/v1/predict", files={"file": ("a.wav", wav())},
                       data={"model_version": "fast", "granularity": "frame",
                             "extract_embedding": "true"})
    assert answer.status_code == 200, answer.text
    body = protocol.Prediction.model_validate(answer.json())
    assert body.model_version == "base" and body.timeline and body.embedding
    assert body.model.weights == "random"


def test_segments_and_models_answer_as_declared(edge):
    segments = edge.post("/v1/segments", files={"file": ("a.wav", wav(2.0))},
                         data={"segments": json.dumps([{"start_s": 0, "end_s": 1,
                                                        "speaker": "a"}])})
    assert segments.status_code == 200, segments.text
    assert protocol.SegmentsAnswer.model_validate(segments.json()).speakers["a"].segments == 1
    lines = edge.post("/v1/segments", files={"file": ("a.wav", wav(2.0))},
                      data={"segments": json.dumps([{"start_s": 0, "end_s": 1}] * 2)},
                      headers={"accept": "application/x-ndjson"})
    parsed = [json.loads(line) for line in lines.text.splitlines()]
    assert [protocol.SegmentLine.model_validate(line).type for line in parsed[:-1]] == \
        ["segment", "segment"]
    assert protocol.SummaryLine.model_validate(parsed[-1]).segments == 2
    models = protocol.ModelsAnswer.model_validate(edge.get("/v1/models").json())
    assert set(models.variants) == set(NAMES) and models.aliases == {"fast": "base"}
    assert protocol.HealthAnswer.model_validate(edge.get("/health").json()).status == "ok"


def test_hugging_face_and_kserve_answer_as_declared(edge):
    labels = edge.post("/v1/audio-classification/fast", content=wav(),
                       params={"top_k": "3"}).json()
    assert [protocol.HfLabel.model_validate(item).label for item in labels][:1] and \
        len(labels) == 3
    audio = base64.b64encode(wav()).decode()
    inferred = edge.post("/v2/models/base/infer", json={"inputs": [
        {"name": "audio", "datatype": "BYTES", "shape": [1], "data": [audio]}]})
    body = protocol_v2.V2InferResponse.model_validate(inferred.json())
    assert [output.name for output in body.outputs] == ["scores", "labels", "emotion"]
    metadata = protocol_v2.V2ModelMetadata.model_validate(edge.get("/v2/models/fast").json())
    assert metadata.versions == [body.model_version]
    refused = edge.post("/v2/models/nope/infer", json={"inputs": []})
    assert refused.status_code == 404 and protocol_v2.V2Error.model_validate(refused.json())


def test_the_openapi_is_generated_from_the_protocol(edge):
    spec = edge.get("/openapi.json").json()
    for path, fields in (("/v1/predict", protocol.PredictFields),
                         ("/v1/segments", protocol.SegmentsFields)):
        operation = spec["paths"][path]["post"]
        query = {p["name"] for p in operation["parameters"] if p["in"] == "query"}
        assert query == set(fields.model_fields)
        form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert set(fields.model_fields) < set(form["properties"]) and form["required"] == ["file"]
    assert "rttm" in spec["paths"]["/v1/segments"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["properties"]
    assert "$defs" not in json.dumps(spec)  # every reference resolves in the document
    prediction = spec["paths"]["/v1/predict"]["post"]["responses"]["200"]
    assert prediction["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Prediction"}


@pytest.mark.parametrize("send, status, code", [
    ({"data": {"model_version": "base"}}, 422, "missing_file"),
    ({"files": {"file": ("a.wav", b"not audio at all")}}, 415, "unsupported_audio"),
    ({"files": {"file": ("a.wav", wav())}, "data": {"model_version": "nope"}}, 400,
     "unknown_model_version"),
    ({"files": {"file": ("a.wav", wav())}, "data": {"granularity": "word"}}, 422,
     "invalid_granularity"),
    ({"files": {"file": ("a.wav", wav())}, "data": {"typo": "1"}}, 422, "unknown_field"),
    ({"files": {"file": ("a.wav", wav(0.01))}}, 422, "audio_too_short"),
    ({"files": {"file": ("a.wav", wav(11))}}, 413, "payload_too_large"),
    ({"files": {"file": ("a.wav", wav(11, rate=8000))}}, 413, "audio_too_long"),
    ({"files": {"file": ("a.wav", wav())}, "data": {"labels": "happy,bored"}}, 400,
     "unknown_label"),
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; "
                                             "boundary=x"}}, 422, "missing_file"),
    ({"content": b"x", "headers": {"content-type": "multipart/form-data"}}, 400,
     "malformed_form"),
    ({"files": {"file": ("a.wav", wav())}, "data": {"extract_embedding": "maybe"}}, 422,
     "invalid_parameter"),
    ({"files": {"file": ("a.wav", b"")}}, 422, "empty_audio"),
    ({"files": {"file": ("a.wav", wav(0))}}, 422, "empty_audio"),
    ({"content": b""}, 422, "empty_audio"),
    ({"content": wav(11)}, 413, "payload_too_large"),
    ({"files": {"other": ("x.wav", b"123")}, "data": {"model_version": "base"}}, 422,
     "unknown_field"),
])
def test_predict_refuses_bad_input_with_its_code(edge, send, status, code):
    answer = edge.post("/v1/predict", **send)
    assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), answer.text
    protocol.ErrorBody.model_validate(answer.json())
    assert edge.post("/v1/predict", files={"file": ("a.wav", wav())}).status_code == 200


def test_an_unknown_version_lists_the_valid_ones(edge):
    answer = edge.post("/v1/predict", files={"file": ("a.wav", wav())},
                       data={"model_version": "huge"})
    assert answer.json()["error"]["valid"] == ["base", "fast", "large"]


def test_the_page_and_the_api_description(edge):
    spec = edge.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"/", "/v1/predict", "/v1/models", "/health", "/ready"} <= set(paths)
    assert not [p for p in paths if p.startswith("/web")]
    assert "text/html" in paths["/"]["get"]["responses"]["200"]["content"]
    form = paths["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"][
        "schema"]
    assert form["properties"]["file"]["format"] == "binary"
    assert form["properties"]["granularity"]["enum"] == ["utterance", "frame"]
    assert form["properties"]["extract_embedding"]["type"] == "boolean"
    docs = edge.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    for bad in ("/web/index.htm", "/web/..%2Frouter.py", "/web/router.py"):
        response = edge.get(bad)
        assert response.status_code == 404, bad
        assert "def predict" not in response.text


def test_raw_audio_sent_as_curl_sends_it(edge):
    """`curl --data-binary @clip.wav URL`: curl says application/x-www-form-urlencoded."""
    for path in ("/v1/predict", "/v1/segments"):
        answer = edge.post(path, params={"model_version": "base"}, content=wav(1.0),
                           headers={"content-type": "application/x-www-form-urlencoded"})
        assert answer.status_code in (200, 501), (path, answer.text)  # 501: no VAD here
        if path == "/v1/predict":
            assert answer.json()["model_version"] == "base"


def test_ready_and_its_strict_view(edge):
    assert edge.get("/ready").json() == {"ready": True,
                                         "variants": dict.fromkeys(NAMES, "ready")}
    assert edge.get("/ready", params={"variant": "base"}).status_code == 200
    assert edge.get("/ready", params={"variant": "nope"}).json()["error"]["code"] == \
        "unknown_variant"


def test_a_stream_sends_its_declared_events(edge):
    events = TypeAdapter(protocol.StreamEvent)
    t = np.arange(int(2.5 * 16_000)) / 16_000
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()
    with edge.websocket_connect("/v1/stream?model_version=fast&hop_s=1") as ws:
        ready = events.validate_python(ws.receive_json())
        assert (ready.type, ready.model_version) == ("ready", "base")
        ws.send_bytes(pcm)
        ws.send_text(json.dumps({"type": "end"}))
        received = []
        for _ in range(20):  # bounded: a window per hop, then the result
            received.append(events.validate_python(ws.receive_json()))
            if received[-1].type in ("result", "error"):
                break
    assert received[-1].type == "result" and received[-1].audio.duration_s == 2.5
    assert {event.type for event in received[:-1]} <= {"window"}


@pytest.mark.parametrize("query, code", [("model_version=nope", "unknown_model_version"),
                                         ("typo=1", "unknown_field"),
                                         ("labels=bored", "unknown_label")])
def test_a_refused_stream_is_an_error_event_and_one_log_line(edge, caplog, query, code):
    with caplog.at_level("INFO", logger="ray.serve.emotion2vec.access"), \
            edge.websocket_connect(f"/v1/stream?{query}") as ws:
        event = TypeAdapter(protocol.StreamEvent).validate_python(ws.receive_json())
    assert (event.type, event.error.code) == ("error", code)
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "ray.serve.emotion2vec.access"]
    assert [(line["kind"], line["code"]) for line in lines] == [("stream", code)]


# -- fuzzed from its own schema ---------------------------------------------------------------
FUZZ_EXAMPLES = 20  # per operation and mode; HYPOTHESIS_PROFILE=explore for more


def _answers_as_declared(case) -> None:
    response = case.call()
    assert response.status_code < 500 or (
        response.status_code == 503 and "retry-after" in response.headers), (
        case.as_curl_command(), response.status_code, response.text[:500])
    case.validate_response(response, checks=[response_schema_conformance,
                                             status_code_conformance, content_type_conformance])


def fuzz(api_schema, mode: GenerationMode, examples: int = FUZZ_EXAMPLES) -> None:
    """Every operation of the generated OpenAPI, with inputs drawn from its own schema: no 5xx
    but a 503 with Retry-After, and every answer as declared."""
    failures = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            _answers_as_declared(case)

        try:
            check()
        except Unsatisfiable:  # no invalid input exists for it (no body, string paths)
            assert mode == GenerationMode.NEGATIVE, operation.label
        except Exception as exc:  # every operation is tried; all failures are reported
            failures.append(f"{operation.label}: {exc}"[:2000])
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_breaks_the_edge(api_schema, mode):
    fuzz(api_schema, mode)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_breaks_the_deployed_edge(service, mode):
    """The same, through the real proxy, Router replica and variant deployments."""
    fuzz(schemathesis.openapi.from_url(service.url + "/openapi.json"), mode, examples=5)
    assert httpx.post(service.url + "/v1/predict", files={"file": ("a.wav", wav())},
                      timeout=60).status_code == 200


def test_the_edge_still_answers_after_the_fuzz(edge):
    answer = edge.post("/v1/predict", files={"file": ("a.wav", wav())})
    assert answer.status_code == 200 and answer.json()["model_version"] == "large"
