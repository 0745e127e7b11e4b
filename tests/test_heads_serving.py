"""Custom heads served, in this process (tests/inprocess.py: real engines on a tiny generated
checkpoint behind the service's own app): the head file's refusals, /v1/heads, `head=` on
every route, scores equal to the head applied to the engine's own embedding, mixed batches,
keys and scopes, canaries and shadows between head revisions."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import pickle
import random

import numpy as np
import pytest
import soundfile
from safetensors.numpy import save
from starlette.testclient import TestClient

from serve_app.config import ModelSettings, RouterSettings
from serve_app.heads import headfile
from serve_app.heads.registry import HeadRegistry
from serve_app.inference.engine import EmotionEngine
from serve_app.wire import Granularity
from tests import inprocess
from tests.head_files import head_bytes, metadata, raw_head
from tests.waiting import eventually

LABELS = ("satisfied", "neutral", "frustrated")


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    checkpoint = inprocess.tiny_checkpoint(tmp_path_factory.mktemp("checkpoints"))
    engine = EmotionEngine(ModelSettings(source=str(checkpoint)), "cpu", 1)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def backbone(engine):
    return engine.info.sha256, engine.info.embedding_dim


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("heads")


@pytest.fixture(scope="module")
def service(engine, heads_dir):
    """base and large over the tiny checkpoint; heads read afresh on every request; a head
    canary (calls-canary: 3 to calls@1, 1 to calls@2) and a head shadow (calls@1 -> calls@2)."""
    settings = RouterSettings(
        default_version="base", decode_workers=0, heads_dir=str(heads_dir),
        heads={"refresh_s": 0, "aliases": {"calls-canary": {"calls@1": 3, "calls@2": 1}},
               "shadow": {"calls@1": "calls@2"}})
    checkpoint = engine.settings.local_path
    with inprocess.local_service(checkpoint, settings, ("base", "large")) as (pipeline, app), \
            TestClient(app) as client:
        yield pipeline, client


@pytest.fixture(scope="module")
def calls(service, backbone):
    """Two revisions of head `calls`, registered over HTTP."""
    _, client = service
    stored = [client.put("/v1/heads/calls", content=head_bytes("calls", *backbone, seed=seed))
              for seed in (1, 2)]
    assert [r.status_code for r in stored] == [201, 201]
    return [r.json() for r in stored]


def wav(seconds: float = 1.0, seed: int = 0) -> bytes:
    noise = np.random.default_rng(seed).normal(size=int(seconds * 16_000)) * 0.1
    buffer = io.BytesIO()
    soundfile.write(buffer, noise.astype(np.float32), 16_000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def waveform(data: bytes) -> np.ndarray:
    return soundfile.read(io.BytesIO(data), dtype="float32")[0]


# -- the head file ------------------------------------------------------------------------------
def _variants(backbone):
    sha256, dim = backbone
    meta = metadata("calls", sha256, dim, list(LABELS))
    good = {"mean": np.zeros(dim, np.float32), "scale": np.ones(dim, np.float32),
            "weight": np.ones((3, dim), np.float32), "bias": np.zeros(3, np.float32)}
    nan = {**good, "weight": np.full((3, dim), np.nan, np.float32)}
    valid = head_bytes("calls", sha256, dim)
    return {
        "a pickle": pickle.dumps({"weight": [1.0] * 10}),
        "truncated": valid[:-17],
        "edited": valid[:-4] + b"\x00\x00\x80\x7f",
        "NaN weights": raw_head(meta, nan),
        "infinite weights": raw_head(meta, {**good, "bias": np.array([np.inf, 0, 0],
                                                                    np.float32)}),
        "wrong shapes": raw_head(meta, {**good, "weight": np.ones((2, dim), np.float32)}),
        "float64 tensors": raw_head(meta, {k: v.astype(np.float64) for k, v in good.items()}),
        "too many labels": raw_head({**meta, "labels": [f"l{i}" for i in range(257)]}, good),
        "an invalid name": raw_head({**meta, "name": "../../etc"}, good),
        "a label with a slash": raw_head({**meta, "labels": ["a/b", "c", "d"]}, good),
        "a safetensors file without head metadata": save({"weight": good["weight"]}),
        "an empty file": b"",
    }


def test_a_head_file_round_trips_and_its_math_is_the_documented_one(backbone):
    sha256, dim = backbone
    for kind in headfile.KINDS:
        head = headfile.decode(head_bytes("calls", sha256, dim, kind=kind), 1 << 24)
        x = np.random.default_rng(3).normal(size=(4, dim)).astype(np.float32)
        logits = head.logits(x)
        t = {k: v.astype(np.float64) for k, v in head.tensors.items()}
        if kind == "prototype":
            unit = x / np.linalg.norm(x, axis=1, keepdims=True)
            expected = unit @ t["centroids"].T
        else:
            z = (x - t["mean"]) / t["scale"]
            if kind == "mlp":
                z = np.maximum(z @ t["hidden_weight"].T + t["hidden_bias"], 0)
            expected = z @ t["weight"].T + t["bias"]
        np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-7)
        scores = head.scores(logits[0], [0, 2])
        row = np.exp(expected[0, [0, 2]] / 1.5)
        np.testing.assert_allclose(scores, row / row.sum(), rtol=1e-7)


def test_every_bad_head_file_is_refused_and_nothing_stored(backbone, tmp_path):
    registry = HeadRegistry(str(tmp_path), max_head_bytes=1 << 22)
    for what, data in _variants(backbone).items():
        with pytest.raises(headfile.InvalidHead):
            registry.put(data)
        assert registry.names() == [], what
    with pytest.raises(headfile.InvalidHead, match="larger than"):
        HeadRegistry(str(tmp_path), max_head_bytes=1024).put(head_bytes("calls", *backbone))


def test_bad_head_files_over_http_are_422_invalid_head(service, backbone):
    _, client = service
    for what, data in _variants(backbone).items():
        response = client.put("/v1/heads/calls", content=data)
        assert (response.status_code, response.json()["error"]["code"]) == \
            (422, "invalid_head"), what
    # A file naming another head than the URL, and a name that cannot be one.
    other = head_bytes("other", *backbone)
    assert client.put("/v1/heads/calls", content=other).json()["error"]["code"] == \
        "invalid_head"
    assert client.put("/v1/heads/Bad%20Name", content=other).json()["error"]["code"] == \
        "invalid_head"


# -- registry and routes ------------------------------------------------------------------------
def test_heads_are_listed_described_and_numbered_for_good(service, backbone, calls):
    _, client = service
    assert [c["revision"] for c in calls] == [1, 2]
    listed = {h["name"]: h for h in client.get("/v1/heads").json()["heads"]}
    assert listed["calls"]["revisions"] == [1, 2]
    assert listed["calls"]["labels"] == list(LABELS)
    assert listed["calls"]["metrics"] == {"ua": 0.8, "wa": 0.82, "macro_f1": 0.79}
    detail = client.get("/v1/heads/calls@1").json()
    assert detail["sha256"] == calls[0]["sha256"] and detail["revision"] == 1
    assert detail["metrics"]["overall"]["confusion"]["labels"] == list(LABELS)
    # A deleted revision's number is never given again.
    temp = head_bytes("temp", *backbone)
    assert client.put("/v1/heads/temp", content=temp).json()["revision"] == 1
    assert client.delete("/v1/heads/temp@1").json() == {"name": "temp", "deleted": [1]}
    assert client.put("/v1/heads/temp", files={"file": ("h.safetensors", temp)}).json()[
        "revision"] == 2
    assert client.delete("/v1/heads/temp").json()["deleted"] == [2]
    assert client.get("/v1/heads/temp").json()["error"]["code"] == "unknown_head"


def test_served_scores_are_the_head_on_the_engines_embedding(service, heads_dir, calls):
    _, client = service
    data = wav(1.3, seed=4)
    plain = client.post("/v1/predict", params={"extract_embedding": "true"}, content=data)
    for reference, stored in (("calls", calls[1]), ("calls@1", calls[0])):
        answer = client.post("/v1/predict", params={"head": reference}, content=data).json()
        assert answer["head"] == stored
        stored_file = heads_dir / "calls" / f"{stored['revision']}.safetensors"
        head = headfile.decode(stored_file.read_bytes(), 1 << 24)
        expected = head.scores(head.logits(np.array([plain.json()["embedding"]]))[0], range(3))
        assert list(answer["scores"]) == list(LABELS)
        np.testing.assert_allclose([answer["scores"][label] for label in LABELS], expected,
                                   atol=1e-5)
        assert answer["emotion"] == LABELS[int(np.argmax(expected))]
        assert answer["confidence"] == pytest.approx(max(expected), abs=1e-5)
    # A label set subsets the head's labels; frame granularity applies the head per window.
    subset = client.post("/v1/predict", params={"head": "calls", "labels": "neutral,Frustrated",
                                                "granularity": "frame"}, content=data).json()
    assert list(subset["scores"]) == ["neutral", "frustrated"]
    assert all(set(w["scores"]) == {"neutral", "frustrated"} for w in subset["timeline"])
    refused = client.post("/v1/predict", params={"head": "calls", "labels": "angry"},
                          content=data).json()
    assert refused["error"]["code"] == "unknown_label"


def test_one_padded_batch_mixes_heads_and_gives_each_clip_its_own_answer(engine, backbone):
    heads = [headfile.decode(head_bytes(f"h{k}", *backbone, kind=kind, seed=k), 1 << 24)
             for k, kind in enumerate(headfile.KINDS)]
    rng = np.random.default_rng(9)
    waves = [(rng.normal(size=n) * 0.1).astype(np.float32) for n in (9000, 16000, 12000, 7000)]
    chosen = [heads[0], heads[1], None, heads[2]]
    batch = engine.predict_batch(waves, Granularity.UTTERANCE, True, None, chosen)
    for wave, head, got in zip(waves, chosen, batch):
        alone = engine.predict(wave, Granularity.UTTERANCE, True, None, head)
        assert got.labels == alone.labels
        np.testing.assert_allclose(got.scores, alone.scores, atol=1e-5)
        if head is not None:  # the head applied in-process to the engine's embedding
            expected = head.scores(head.logits(alone.embedding[None])[0], range(3))
            np.testing.assert_allclose(got.scores, expected, atol=1e-5)


def test_unknown_deleted_and_foreign_heads_are_refused(service, backbone):
    _, client = service
    data = wav()
    assert client.post("/v1/predict", params={"head": "nope"}, content=data).json()[
        "error"]["code"] == "unknown_head"
    assert client.post("/v1/predict", params={"head": "calls@99"}, content=data).status_code \
        == 404
    assert client.post("/v1/predict", params={"head": "a b"}, content=data).status_code == 422
    foreign = head_bytes("foreign", "0" * 64, backbone[1])
    assert client.put("/v1/heads/foreign", content=foreign).status_code == 201
    answer = client.post("/v1/predict", params={"head": "foreign"}, content=data)
    assert (answer.status_code, answer.json()["error"]["code"]) == \
        (409, "head_backbone_mismatch")
    # Registered while serving: used at once (refresh_s=0); deleted: 404 at once.
    late = head_bytes("late", *backbone, seed=5)
    assert client.put("/v1/heads/late", content=late).status_code == 201
    assert client.post("/v1/predict", params={"head": "late"}, content=data).status_code == 200
    assert client.delete("/v1/heads/late").status_code == 200
    assert client.post("/v1/predict", params={"head": "late"}, content=data).json()[
        "error"]["code"] == "unknown_head"


def test_head_canary_splits_by_weight_and_sticks_per_session(service, calls):
    pipeline, client = service

    async def pick(key):
        ref, routed_by = await pipeline.choose_head("calls-canary", key)
        assert routed_by == "calls-canary"
        return ref.revision

    loop = asyncio.new_event_loop()
    try:
        picks = [loop.run_until_complete(pick(f"user-{i}")) for i in range(400)]
        again = [loop.run_until_complete(pick(f"user-{i}")) for i in range(400)]
    finally:
        loop.close()
    assert picks == again  # sticky
    assert 0.18 < picks.count(2) / 400 < 0.32  # 1 in 4 to calls@2
    headers = {"X-Session-Key": "user-7"}
    answer = client.post("/v1/predict", params={"head": "calls-canary"}, content=wav(),
                         headers=headers).json()
    assert answer["head"]["revision"] == picks[7]


def test_a_head_shadow_reports_the_agreement_of_two_revisions(service, calls):
    _, client = service

    def shadow_stats():
        return client.get("/v1/rollouts").json()["shadow"]["calls@1"]

    eventually(lambda: shadow_stats()["compared"] == shadow_stats()["compared"],
               "no comparison in flight", timeout_s=30)
    before = shadow_stats()["compared"]
    for seed in range(3):
        assert client.post("/v1/predict", params={"head": "calls@1"},
                           content=wav(seed=seed)).status_code == 200

    def compared():
        stats = shadow_stats()
        assert stats["target"] == "calls@2" and stats["compared"] == before + 3, stats
        return stats

    stats = eventually(compared, "three shadow comparisons", timeout_s=30, interval_s=0.2,
                       retry_on=(AssertionError,))
    assert stats["errors"] == 0 and 0 <= stats["top1_agreement"] <= 1


def test_hugging_face_and_kserve_reach_a_head_through_the_model_name(service, calls):
    _, client = service
    data = wav(seed=2)
    direct = client.post("/v1/predict", params={"head": "calls@2"}, content=data).json()
    hf = client.post("/v1/audio-classification/base+calls@2", content=data).json()
    assert {row["label"]: row["score"] for row in hf} == pytest.approx(direct["scores"],
                                                                        abs=1e-6)
    body = {"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(data).decode()]}]}
    for name, parameters in (("+calls@2", {}), ("base", {"head": "calls@2"})):
        v2 = client.post(f"/v2/models/{name}/infer", json={**body, "parameters": parameters})
        outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
        assert outputs["labels"] == list(LABELS)
        np.testing.assert_allclose(outputs["scores"], [direct["scores"][x] for x in LABELS],
                                   atol=1e-6)
    assert client.get("/v2/models/base+nope").status_code == 404
    # The scheme is named where clients look: /v1/models and the v2 model metadata.
    metadata = client.get("/v2/models/base+calls@2").json()
    assert metadata["name"] == "base+calls@2" and "VARIANT+HEAD" in metadata["parameters"]["head"]
    scheme = client.get("/v1/models").json()["heads"]
    assert "VARIANT+HEAD" in scheme["model_name"] and scheme["list"] == "/v1/heads"
    assert scheme["aliases"] == {"calls-canary": {"calls@1": 3, "calls@2": 1}}


def test_a_stream_scores_its_windows_with_the_head(service, calls):
    _, client = service
    pcm = (waveform(wav(2.0, seed=6)) * 32767 * 0.5).astype("<i2").tobytes()
    with client.websocket_connect("/v1/stream?head=calls@1&hop_s=1") as ws:
        ready = ws.receive_json()
        assert ready["head"] == calls[0]
        ws.send_bytes(pcm)
        ws.send_text('{"type": "end"}')
        events = []
        for _ in range(20):
            events.append(ws.receive_json())
            if events[-1]["type"] in ("result", "error"):
                break
    assert events[-1]["type"] == "result"
    assert all(set(e["scores"]) == set(LABELS) for e in events if "scores" in e)
    with client.websocket_connect("/v1/stream?head=calls&labels=angry") as ws:
        assert ws.receive_json()["error"]["code"] == "unknown_label"


def test_keys_read_heads_and_only_writers_change_them(engine, backbone, tmp_path):
    settings = RouterSettings(
        default_version="base", decode_workers=0, heads_dir=str(tmp_path),
        api_keys={"reader": {"sha256": sha("k-read")},
                  "writer": {"sha256": sha("k-write"), "heads": "write"}})
    data = head_bytes("calls", *backbone)
    with inprocess.local_service(engine.settings.local_path, settings) as (_, app), \
            TestClient(app) as client:
        reader, writer = ({"X-API-Key": key} for key in ("k-read", "k-write"))
        assert client.get("/v1/heads").status_code == 401
        refused = client.put("/v1/heads/calls", content=data, headers=reader)
        assert (refused.status_code, refused.json()["error"]["code"]) == (403, "forbidden")
        assert client.put("/v1/heads/calls", content=data, headers=writer).status_code == 201
        assert client.get("/v1/heads", headers=reader).json()["heads"][0]["name"] == "calls"
        assert client.post("/v1/predict", params={"head": "calls"}, content=wav(),
                           headers=reader).status_code == 200
        assert client.delete("/v1/heads/calls", headers=reader).status_code == 403
        assert client.delete("/v1/heads/calls", headers=writer).status_code == 200


def test_head_aliases_are_weighted_like_variant_aliases():
    from serve_app.traffic.routing import Aliases

    aliases = Aliases({"calls": {"calls@3": 9, "calls@4": 1}, "pinned": "calls@3"},
                      rng=random.Random(0))
    draws = [aliases.pick("calls") for _ in range(2000)]
    assert 0.07 < draws.count("calls@4") / 2000 < 0.13
    assert aliases.pick("pinned") == "calls@3"
    assert aliases.fractions()["calls"] == {"calls@3": 0.9, "calls@4": 0.1}
