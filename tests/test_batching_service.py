"""Dynamic batching in the deployed service: concurrent requests of mixed lengths run as
padded batches, and each answer equals FunASR's single-clip result."""

from __future__ import annotations

import threading

import numpy as np
import soundfile

from serve_app import audio
from tests.test_lifecycle import Client, make_app, tiny


def test_concurrent_requests_are_batched_and_match_funasr(cluster, tmp_path_factory,
                                                         funasr_models):
    root = tmp_path_factory.mktemp("batched")
    app = make_app(root, name="batched", prefix="/batched", variants=("base",),
                   base={**tiny(root, 8), "max_batch_size": 8, "batch_wait_timeout_s": 0.2})
    cluster.put(app)
    try:
        assert cluster.wait_for("batched", ("RUNNING", "DEPLOY_FAILED")).status == "RUNNING"
        client = Client(cluster.url, "/batched")
        clips = []
        for index, seconds in enumerate([0.4, 1.0, 1.37, 2.0, 2.9, 3.3, 4.1, 5.0]):
            t = np.arange(int(seconds * 16_000)) / 16_000
            samples = (0.2 * np.sin(2 * np.pi * (150 + 40 * index) * t)).astype(np.float32)
            path = root / f"clip{index}.wav"
            soundfile.write(path, samples, 16_000, subtype="FLOAT")
            clips.append(path)
        answers: dict[int, dict] = {}

        def send(index: int) -> None:
            response = client.predict(clips[index], extract_embedding="true",
                                      granularity="frame")
            answers[index] = response.json() if response.status_code == 200 else {
                "error": response.text}

        senders = [threading.Thread(target=send, args=(i,)) for i in range(len(clips))]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=120)
        info = client.variant("base")
        assert info["largest_batch"] > 1, info
        model = funasr_models(root / "tiny-seed8")
        for index, path in enumerate(clips):
            body = answers[index]
            assert "error" not in body, body
            decoded = audio.decode(path.read_bytes(), max_duration_s=60, min_duration_s=0.1)
            expected = model.generate(decoded.waveform, granularity="frame",
                                      extract_embedding=True)[0]
            np.testing.assert_allclose(list(body["scores"].values()), expected["scores"],
                                       atol=1e-4, rtol=0)
            np.testing.assert_allclose(body["embedding"], expected["feats"], atol=1e-4, rtol=0)

        # Batch settings change live: no reload.
        cluster.put(make_app(root, name="batched", prefix="/batched", variants=("base",),
                             base={**tiny(root, 8), "max_batch_size": 1}))
        changed = client.wait("base", lambda i: i["max_batch_size"] == 1, timeout_s=60)
        assert changed["load_count"] == info["load_count"]
    finally:
        cluster.remove("batched")
