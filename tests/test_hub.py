"""Hub ids without network: a pre-filled hub cache serves offline, and a model that is not
cached fails within the download bound with a message that says what to do."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from serve_app.checkpoints import generate
from serve_app.config import ModelSettings
from serve_app.inference.engine import EmotionEngine, ModelLoadError
from tests.conftest import REPO

COMMIT = "6c303ba" + "0" * 33  # a snapshot's name in the Hugging Face cache: its commit

# Loads each hub id in a fresh process, as a replica started with these variables would.
LOAD_OFFLINE = """
import json, sys
import numpy as np
from serve_app.config import ModelSettings
from serve_app.inference.engine import EmotionEngine
clip = np.load(sys.argv[1])
results = {}
for source, hub, loader in json.loads(sys.argv[2]):
    engine = EmotionEngine(ModelSettings(source=source, hub=hub, loader=loader,
                                         download_timeout_s=5), "cpu", 1)
    info = engine.load()
    prediction = engine.predict(clip, "utterance", True)
    results[source] = {"directory": info.directory, "source": info.source,
                       "weights": info.weights, "scores": prediction.scores,
                       "embedding": prediction.embedding.tolist()}
print(json.dumps(results))
"""


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_prefilled_hub_caches_serve_offline(tmp_path, funasr_models):
    checkpoint = generate.write_checkpoint(tmp_path / "tiny", "tiny", 41)
    files = [p for p in checkpoint.iterdir() if p.is_file()]
    ms_cache, hf_home = tmp_path / "modelscope", tmp_path / "huggingface"
    # ModelScope's layout (modelscope >= 1.38), and the older one FunASR's users may have.
    shutil.copytree(checkpoint, ms_cache / "models" / "iic--emotion2vec_plus_large"
                    / "snapshots" / "master")
    shutil.copytree(checkpoint, ms_cache / "models" / "iic" / "emotion2vec_plus_base")
    # Hugging Face's: blobs, a snapshot of links to them, and refs/main naming the snapshot.
    repo = hf_home / "hub" / "models--emotion2vec--emotion2vec_plus_large"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for index, path in enumerate(files):
        blob = repo / "blobs" / f"{index:040x}"
        shutil.copyfile(path, blob)
        (repo / "snapshots" / COMMIT / path.name).symlink_to(blob)

    clip = (np.random.default_rng(3).standard_normal(24_000) * 0.1).astype(np.float32)
    np.save(tmp_path / "clip.npy", clip)
    wanted = [("iic/emotion2vec_plus_large", "ms", "mmap"),
              ("iic/emotion2vec_plus_base", "ms", "funasr"),
              ("emotion2vec/emotion2vec_plus_large", "hf", "mmap")]
    closed = f"http://127.0.0.1:{_closed_port()}"  # any network attempt would fail
    env = {**os.environ, "PYTHONPATH": str(REPO), "MODELSCOPE_CACHE": str(ms_cache),
           "HF_HOME": str(hf_home), "MODELSCOPE_ENDPOINT": closed, "HF_ENDPOINT": closed}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", LOAD_OFFLINE, str(tmp_path / "clip.npy"),
                          json.dumps(wanted)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])

    expected = funasr_models(checkpoint).generate(clip, extract_embedding=True)[0]
    for source, _, _ in wanted:
        result = results[source]
        assert result["source"] == source and result["weights"] == "random"
        assert result["directory"].startswith(str(ms_cache if "iic/" in source else hf_home))
        np.testing.assert_allclose(result["scores"], expected["scores"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(result["embedding"], expected["feats"], atol=1e-5, rtol=0)


@pytest.fixture
def unanswering_endpoint():
    """A port that accepts connections and never answers: a client without its own deadline
    waits on it for as long as it is willing to."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.mark.parametrize("hub,endpoint_variable,expected", [
    ("ms", "MODELSCOPE_ENDPOINT", r"it was not downloaded within 3 s"),
    ("hf", "HF_ENDPOINT", r"the download failed"),
])
def test_a_model_not_cached_fails_in_bounded_time_saying_what_to_do(
        hub, endpoint_variable, expected, tmp_path, monkeypatch, unanswering_endpoint):
    # ModelScope: an endpoint that never answers (only the bound ends the wait);
    # Hugging Face: a closed port (the client fails at once).
    endpoint = unanswering_endpoint if hub == "ms" else f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv(endpoint_variable, endpoint)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "huggingface"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    source = "nobody-here/never-cached-model"
    engine = EmotionEngine(ModelSettings(source=source, hub=hub, download_timeout_s=3),
                           "cpu", 1)
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as caught:
        engine.load()
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert f"{source} is not in the" in message
    assert re.search(expected, message), message
    assert "Pre-fill the cache" in message and "set `source` to a local directory" in message
    assert (f"modelscope download --model {source}" if hub == "ms"
            else f"hf download {source}") in message
