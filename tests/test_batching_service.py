"""Dynamic batching in the deployed service: concurrent requests of mixed lengths, and the
windows of concurrent streams, run as padded batches, and each answer equals the single-clip
result."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from serve_app.audio import sndfile
from serve_app.heads import headfile
from tests.head_files import head_bytes
from tests.test_lifecycle import Client, make_app, tiny
from tests.test_stream import assert_scores_equal, lockstep, open_stream, predicted
from tests.traffic import in_threads

BATCHING = {"max_batch_size": 8, "batch_wait_timeout_s": 0.2}


def batched_app(root, base_batching: dict = BATCHING) -> dict:
    router = {"default_version": "base", "heads_dir": str(root / "heads")}
    return make_app(root, name="batched", prefix="/batched", variants=("base", "large"),
                    router=router, base={**tiny(root, 8), **base_batching},
                    large={**tiny(root, 9), **BATCHING})


@pytest.fixture(scope="module")
def batched(cluster, tmp_path_factory):
    """base and large with batching on: base for predict requests, large for streams."""
    root = tmp_path_factory.mktemp("batched")
    cluster.put(batched_app(root))
    assert cluster.wait_for("batched", ("RUNNING", "DEPLOY_FAILED")).status == "RUNNING"
    yield root, Client(cluster.url, "/batched")
    cluster.remove("batched")


def test_concurrent_requests_are_batched_and_match_funasr(cluster, batched, funasr_models):
    root, client = batched
    clips = []
    for index, seconds in enumerate([0.4, 1.0, 1.37, 2.0, 2.9, 3.3, 4.1, 5.0]):
        t = np.arange(int(seconds * 16_000)) / 16_000
        samples = (0.2 * np.sin(2 * np.pi * (150 + 40 * index) * t)).astype(np.float32)
        path = root / f"clip{index}.wav"
        soundfile.write(path, samples, 16_000, subtype="FLOAT")
        clips.append(path)

    def send(path):
        response = client.predict(path, extract_embedding="true", granularity="frame",
                                  model_version="base")
        return response.json() if response.status_code == 200 else {"error": response.text}

    answers = in_threads(*[lambda path=path: send(path) for path in clips], timeout_s=120)
    info = client.variant("base")
    assert info["largest_batch"] > 1, info
    model = funasr_models(root / "tiny-seed8")
    for index, path in enumerate(clips):
        body = answers[index]
        assert "error" not in body, body
        decoded = sndfile.decode(path.read_bytes(), max_duration_s=60, min_duration_s=0.1)
        expected = model.generate(decoded.waveform, granularity="frame",
                                  extract_embedding=True)[0]
        np.testing.assert_allclose(list(body["scores"].values()), expected["scores"],
                                   atol=1e-4, rtol=0)
        np.testing.assert_allclose(body["embedding"], expected["feats"], atol=1e-4, rtol=0)

    # Batch settings change live: no reload.
    cluster.put(batched_app(root, {"max_batch_size": 1}))
    try:
        changed = client.wait("base", lambda i: i["max_batch_size"] == 1, timeout_s=60)
        assert changed["load_count"] == info["load_count"]
    finally:
        cluster.put(batched_app(root))
        client.wait("base", lambda i: i["max_batch_size"] == BATCHING["max_batch_size"],
                    timeout_s=60)


def test_windows_of_concurrent_streams_share_padded_batches(cluster, batched):
    """Four streams in lock-step at once: their windows meet in the variant's batches, and
    each window still equals predict on its own samples."""
    _, client = batched
    assert client.variant("large")["largest_batch"] == 0  # nothing has run on large yet
    raws = [np.round(0.3 * np.sin(2 * np.pi * (170 + 30 * i) * np.arange(24_000) / 16_000)
                     * 32767).astype(np.int16) for i in range(4)]

    def run(raw: np.ndarray) -> list[dict]:
        with open_stream(cluster.url + "/batched", model_version="large", window_s=1.0,
                         hop_s=0.5) as (ws, _):
            return lockstep(ws, raw, 16_000, 0.5)

    events = in_threads(*[lambda raw=raw: run(raw) for raw in raws], timeout_s=120)
    assert client.variant("large")["largest_batch"] > 1
    for index, raw in enumerate(raws):
        *windows, result = events[index]
        assert [w["end_s"] for w in windows] == [0.5, 1.0, 1.5] and result["type"] == "result"
        for window in windows:
            start, end = round(window["start_s"] * 16_000), round(window["end_s"] * 16_000)
            assert_scores_equal(window, predicted(client.http, raw[start:end], 16_000, "large"))


def test_one_batch_mixes_three_heads_and_the_models_own(cluster, batched):
    """Concurrent requests for three custom heads and the nine-class head meet in the variant's
    padded batches (heads apply after pooling: no split); each gets what it gets alone."""
    root, client = batched
    info = client.variant("base")
    kinds = headfile.KINDS
    for seed, kind in enumerate(kinds):
        head = head_bytes(kind, info["sha256"], info["embedding_dim"], kind=kind, seed=seed)
        assert client.http.put(f"/v1/heads/{kind}", content=head).status_code == 201
    clips = []
    for index, seconds in enumerate([0.6, 1.1, 1.7, 2.3, 0.9, 1.4, 2.0, 2.6]):
        t = np.arange(int(seconds * 16_000)) / 16_000
        samples = (0.2 * np.sin(2 * np.pi * (160 + 35 * index) * t)).astype(np.float32)
        path = root / f"mixed{index}.wav"
        soundfile.write(path, samples, 16_000, subtype="FLOAT")
        clips.append((path, {"head": kinds[index % 4]} if index % 4 < 3 else {}))

    def send(path, fields):
        response = client.predict(path, model_version="base", **fields)
        assert response.status_code == 200, response.text
        return response.json()

    together = in_threads(*[lambda c=c: send(*c) for c in clips], timeout_s=120)
    for (path, fields), mixed in zip(clips, together):
        alone = send(path, fields)
        assert (mixed["head"] or {}).get("name") == fields.get("head")
        assert list(mixed["scores"]) == list(alone["scores"])
        np.testing.assert_allclose(list(mixed["scores"].values()),
                                   list(alone["scores"].values()), atol=1e-5, rtol=0)
