"""`emotion2vec-serve export --format onnx` on the tiny model: the exported graph (encoder, head,
per-clip normalisation) against FunASR's own AutoModel.generate on the same checkpoint, its
model.json, and example.py run the way a user runs it (onnxruntime, numpy and soundfile only).
No Ray: the export loads the variant in-process from a Serve config."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

from serve_app.checkpoints import generate
from serve_app.labels import english_name
from serve_app.tools import cli
from serve_app.tools.export import PARITY_TOLERANCE
from tests import clips as clip_maker


def _config(path: Path, source: Path) -> Path:
    """A Serve config with one variant, `base`, on `source`, as configs/cpu.yaml has them."""
    path.write_text(yaml.safe_dump({"applications": [{
        "name": "emotion2vec", "import_path": "serve_app.app:build_app",
        "args": {"variants": {"base": {"num_cpus": 0.4}}},
        "deployments": [{"name": "Router", "user_config": {"default_version": "base"}},
                        {"name": "base", "user_config": {"source": str(source),
                                                         "threads": 1}}]}]}))
    return path


def _export(tmp: Path, checkpoint: Path) -> Path:
    out = tmp / "onnx"
    code = cli.main(["export", "--model-version", "base", "--format", "onnx", "--out", str(out),
                     "--config", str(_config(tmp / "serve.yaml", checkpoint))])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("export-ckpt") / "tiny-seed5"
    generate.write_checkpoint(path, "tiny", 5)
    return path


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("export"), tiny)


def _clips() -> list[np.ndarray]:
    """Tones and noise of lengths that are not multiples of anything; 640 samples: 1 frame."""
    rng = np.random.default_rng(8)
    return [clip_maker.tone(1.0, 16_000, 180.0, 1), clip_maker.tone(2.3, 16_000, 260.0, 2),
            (rng.standard_normal(29_999) * 0.1).astype(np.float32),
            clip_maker.tone(0.04, 16_000, 300.0, 3),
            (clip_maker.tone(3.1, 16_000, 120.0, 4) * 0.01).astype(np.float32)]


def _run(session, clips: list[np.ndarray], filler: float = 0.0):
    """scores, logits, embedding of `clips` as one padded batch; past each clip's end the
    waveform holds `filler` (the graph must ignore it)."""
    lengths = np.array([len(c) for c in clips], dtype=np.int64)
    waveform = np.full((len(clips), int(lengths.max()) + 321), filler, dtype=np.float32)
    for i, clip in enumerate(clips):
        waveform[i, :len(clip)] = clip
    return session.run(["scores", "logits", "embedding"],
                       {"waveform": waveform, "lengths": lengths})


def _session(directory: Path):
    return ort.InferenceSession(str(directory / "model.onnx"),
                                providers=["CPUExecutionProvider"])


def test_scores_equal_funasr_generate_alone_and_in_a_mixed_batch(exported, tiny, funasr_models):
    auto = funasr_models(tiny)
    session = _session(exported)
    clips = _clips()
    expected = [auto.generate(c, granularity="utterance", extract_embedding=True)[0]
                for c in clips]
    for clip, reference in zip(clips, expected):
        scores, logits, embedding = _run(session, [clip])
        np.testing.assert_allclose(scores[0], reference["scores"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(embedding[0], reference["feats"], atol=1e-4, rtol=0)
        softmax = np.exp(logits[0] - logits[0].max())
        np.testing.assert_allclose(scores[0], softmax / softmax.sum(), atol=1e-6, rtol=0)
    # Mixed lengths in one batch, the padding full of loud garbage: each row is its clip alone.
    scores, _, embedding = _run(session, clips, filler=0.7)
    for row, reference in enumerate(expected):
        np.testing.assert_allclose(scores[row], reference["scores"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(embedding[row], reference["feats"], atol=1e-4, rtol=0)


def test_model_json_describes_the_graph_and_the_checkpoint(exported, tiny, funasr_models):
    meta = json.loads((exported / "model.json").read_text(encoding="utf-8"))
    session = _session(exported)
    assert [i.name for i in session.get_inputs()] == list(meta["inputs"]) \
        == ["waveform", "lengths"]
    assert [o.name for o in session.get_outputs()] == list(meta["outputs"]) \
        == ["scores", "logits", "embedding"]
    # Batch and length are dynamic in the graph itself.
    assert all(isinstance(d, str) for d in session.get_inputs()[0].shape)
    graph = onnx.load(str(exported / "model.onnx"), load_external_data=False)
    assert meta["opset"] == next(o.version for o in graph.opset_import
                                 if o.domain in ("", "ai.onnx"))
    with open(tiny / "model.pt", "rb") as handle:
        assert meta["checkpoint_sha256"] == hashlib.file_digest(handle, "sha256").hexdigest()
    funasr_labels = funasr_models(tiny).generate(_clips()[0])[0]["labels"]
    assert [label["name"] for label in meta["labels"]] == \
        [english_name(label) for label in funasr_labels]
    assert meta["outputs"]["scores"]["shape"] == ["batch", len(funasr_labels)]
    assert meta["sample_rate"] == 16_000 and "layer-normalised" in meta["normalization"]
    parity = meta["parity"]
    assert len(parity["clips"]) >= 5 and parity["batch"]["clips"] == len(parity["clips"])
    assert len({clip["seconds"] for clip in parity["clips"]}) == len(parity["clips"])
    assert parity["within_tolerance"] and parity["max_score_diff"] <= PARITY_TOLERANCE
    # The weights sit in the data file beside the graph, not in the graph file.
    weights = (exported / meta["files"]["weights"]).stat().st_size
    assert (exported / "model.onnx").stat().st_size < weights / 4


def test_example_runs_without_torch_or_funasr_and_prints_funasr_emotion(
        exported, tiny, funasr_models, tmp_path):
    clip = _clips()[1]
    wav = clip_maker.write(tmp_path / "clip.wav", clip, 16_000, "FLOAT")
    reference = funasr_models(tiny).generate(clip)[0]
    emotion = english_name(reference["labels"][int(np.argmax(reference["scores"]))])
    # Run as a user runs it, in a clean environment (no PYTHONPATH: this project is not
    # importable), then list what it imported.
    wrapper = ("import runpy, sys; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__'); "
               "print('imported:', sorted(m for m in ('torch', 'funasr', 'serve_app') "
               "if m in sys.modules))")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-I", "-c", wrapper,
                           str(exported / "example.py"), str(wav)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"emotion: {emotion} (")
    assert lines[-1] == "imported: []"


def test_a_model_without_normalisation_takes_the_samples_as_they_are(tmp_path, funasr_models):
    """normalize: false in the config: the graph leaves the waveform alone, as FunASR does
    (a louder clip then gives other scores)."""
    checkpoint = tmp_path / "tiny-raw"
    generate.write_checkpoint(checkpoint, "tiny", 6)
    config = checkpoint / "config.yaml"
    config.write_text(config.read_text().replace("normalize: true", "normalize: false"))
    out = _export(tmp_path, checkpoint)
    meta = json.loads((out / "model.json").read_text(encoding="utf-8"))
    assert meta["normalization"].startswith("none")
    auto = funasr_models(checkpoint)
    session = _session(out)
    clip = _clips()[0]
    for gain in (1.0, 3.0):
        scores, _, _ = _run(session, [clip * gain])
        reference = auto.generate(clip * gain)[0]["scores"]
        np.testing.assert_allclose(scores[0], reference, atol=1e-5, rtol=0)
    louder = _run(session, [clip * 3.0])[0][0]
    assert not np.allclose(louder, _run(session, [clip])[0][0], atol=1e-6, rtol=0)


def test_an_unknown_model_version_exports_nothing(tmp_path, tiny, capsys):
    out = tmp_path / "nothing"
    code = cli.main(["export", "--model-version", "huge", "--out", str(out),
                     "--config", str(_config(tmp_path / "serve.yaml", tiny))])
    assert code == 2 and not out.exists()
    assert "unknown model_version 'huge'" in capsys.readouterr().err


def test_export_openvino_fills_a_compiled_cache_that_replicas_then_reuse(tmp_path, tiny, capsys):
    """`--format openvino` writes the variant's artefact as a replica would: a replica pointed
    at the folder finds it (a hit: no conversion), with the blob compiled for this CPU kind
    beside the IR, which is keyed without the CPU (a fleet of any CPUs converts once)."""
    from serve_app.config import ModelSettings
    from serve_app.inference.backends import common
    from serve_app.inference.engine import EmotionEngine

    out = tmp_path / "compiled"
    code = cli.main(["export", "--model-version", "base", "--format", "openvino", "--out",
                     str(out), "--config", str(_config(tmp_path / "serve.yaml", tiny))])
    assert code == 0, capsys.readouterr().err
    (folder,) = [path.parent for path in out.glob("*/encoder.xml")]
    assert str(folder) in capsys.readouterr().err
    key = json.loads((folder / "key.json").read_text())
    assert "cpu" not in key and key["backend"] == "openvino"
    assert (folder / f"blobs-f32-{common.cpu_tag()}").is_dir()
    replica = EmotionEngine(ModelSettings(source=str(tiny), backend="openvino",
                                          compiled_cache_dir=str(out)), "cpu", 1)
    replica.load()
    assert replica.info.backend == "openvino"
    assert replica.info.backend_info["cache"] == "hit"
    assert replica.info.backend_info["cache_dir"] == str(folder)
