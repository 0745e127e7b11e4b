"""Custom heads in the deployed service (the session's cluster): a head registered over HTTP
is served with no redeploy, deleted it answers 404, and `emotion2vec-serve batch --head` gives
the rows POST /v1/predict gives with the same head."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import yaml

from serve_app.heads import headfile
from serve_app.tools.batch.parts import read_rows
from tests.head_files import head_bytes
from tests.test_batch import SMALL, run_batch
from tests.waiting import eventually


def _backbone(service, variant: str = "base") -> tuple[str, int]:
    model = service.checkpoints[variant] / "model.pt"
    return hashlib.sha256(model.read_bytes()).hexdigest(), 64  # tiny: 64-d embeddings


def test_a_head_registered_while_serving_is_served_then_deleted(service, client, clips):
    data = clips["tone_16k_mono_wav"].read_bytes()
    head = head_bytes("support-calls", *_backbone(service), seed=11)
    stored = client.put("/v1/heads/support-calls", content=head)
    assert stored.status_code == 201, stored.text
    plain = client.post("/v1/predict", files={"file": ("a.wav", data)},
                        data={"model_version": "base", "extract_embedding": "true"}).json()
    answer = client.post("/v1/predict", files={"file": ("a.wav", data)},
                         data={"model_version": "base", "head": "support-calls"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["head"] == stored.json()
    served = headfile.decode(head, 1 << 24)
    expected = served.scores(served.logits(np.array([plain["embedding"]]))[0], range(3))
    np.testing.assert_allclose(list(body["scores"].values()), expected, atol=1e-5)
    # Another checkpoint (large's) refuses it: 409.
    refused = client.post("/v1/predict", files={"file": ("a.wav", data)},
                          data={"model_version": "large", "head": "support-calls"})
    assert (refused.status_code, refused.json()["error"]["code"]) == \
        (409, "head_backbone_mismatch")
    assert client.delete("/v1/heads/support-calls").status_code == 200

    def gone():
        response = client.post("/v1/predict", files={"file": ("a.wav", data)},
                               data={"model_version": "base", "head": "support-calls"})
        return response.status_code == 404 and \
            response.json()["error"]["code"] == "unknown_head"

    # Within heads.refresh_s (the tiny config's default, 2 s) on every Router replica.
    eventually(gone, "the deleted head answers 404", timeout_s=10, interval_s=0.2)


def test_batch_with_a_head_gives_predicts_rows(service, client, clips, address, tmp_path):
    head = head_bytes("batch-calls", *_backbone(service), kind="mlp", seed=12)
    assert client.put("/v1/heads/batch-calls", content=head).status_code == 201
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"applications": [service.app]}))
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("tone_16k_mono_wav", "stereo_44k_flac"):
        (folder / clips[name].name).write_bytes(clips[name].read_bytes())
    out = tmp_path / "out"
    done = run_batch(str(folder), "--out", str(out), "--config", str(config), "--address",
                     address, "--model-version", "base", "--head", "batch-calls", *SMALL)
    assert done.returncode == 0, done.stderr
    rows = read_rows(out).to_pylist()
    assert len(rows) == 2
    for row in rows:
        assert row["head"] == "batch-calls@1"
        path = folder / row["path"].rsplit("/", 1)[-1]
        body = client.post("/v1/predict", files={"file": (path.name, path.read_bytes())},
                           data={"model_version": "base", "head": "batch-calls"}).json()
        assert body["emotion"] == row["emotion"]
        scores = [row[f"score_{label}"] for label in body["scores"]]
        np.testing.assert_allclose(scores, list(body["scores"].values()), atol=1e-4)
    # A head the config's heads_dir lacks: the job does not start (exit 2, named).
    missing = subprocess.run([sys.executable, "-m", "serve_app.tools.cli", "batch", str(folder),
                              "--out", str(tmp_path / "none"), "--config", str(config),
                              "--head", "nope"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--head nope: no head nope" in missing.stderr
