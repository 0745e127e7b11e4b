"""`precision: int8` on openvino (serve_app/inference/backends/int8.py), in-process on the tiny
model with a small calibration set: it builds, is cached (a second load is a hit), stays within
its bound of fp32, refuses itself for openvino reduced when its check fails (with the reason),
and is a validation error on the other backends. base and large: benchmarks/cpu.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F

from serve_app.checkpoints import generate
from serve_app.config import ModelSettings
from serve_app.inference.backends import common, int8, openvino
from serve_app.inference.engine import EmotionEngine
from tests import clips as clip_maker

pytest.importorskip("openvino")
pytest.importorskip("nncf")
SMALL = int8.Recipe(clips=3, max_s=1.5)  # seconds of quantisation on tiny, not minutes


def _clips() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [clip_maker.tone(1.2, 16_000, 170.0, 1), clip_maker.tone(2.1, 16_000, 240.0, 2),
            (rng.standard_normal(20_011) * 0.1).astype(np.float32)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("int8-ckpt") / "tiny-seed3"
    generate.write_checkpoint(path, "tiny", 3)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("int8-compiled")


@pytest.fixture(autouse=True)
def small_recipe(monkeypatch):
    monkeypatch.setattr(int8, "RECIPE", SMALL)


def _engine(tiny: Path, cache: Path, precision: str) -> EmotionEngine:
    engine = EmotionEngine(ModelSettings(source=str(tiny), backend="openvino",
                                         precision=precision, compiled_cache_dir=str(cache)),
                           "cpu", 1)
    engine.load()
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def fp32(tiny, cache):
    return _engine(tiny, cache, "fp32")


def test_int8_builds_is_cached_and_stays_within_its_bound(tiny, cache, fp32):
    first = _engine(tiny, cache, "int8")
    info = first.info.backend_info
    assert first.info.backend == "openvino" and info["precision"] == "int8"
    assert first.info.dtype == "int8" and first.identity()["precision"] == "int8"
    assert info["cache"] == "miss"
    assert info["check_diff"] <= common.CHECK_TOLERANCE["int8"]
    folder = Path(info["cache_dir"])
    assert folder != Path(fp32.info.backend_info["cache_dir"])  # its own folder
    key = json.loads((folder / "key.json").read_text())
    assert key["backend"] == "openvino-int8" and "nncf" in key
    assert key["calibration"]["clips"] == SMALL.clips
    if int8.espeak_version():
        assert key["calibration"]["source"].startswith("espeak-ng")
    else:
        assert key["calibration"]["source"] == "tones"
        assert "espeak-ng is not installed" in info["note"]
    xml = (folder / openvino.IR_NAME).read_text()
    assert "FakeQuantize" in xml  # really quantised, not the f32 IR under another name

    again = _engine(tiny, cache, "int8")
    assert again.info.backend_info["cache"] == "hit"
    assert again.info.backend_info["cache_dir"] == str(folder)
    for clip in _clips():
        ours = first.predict(clip, "utterance", True)
        reference = fp32.predict(clip, "utterance", True)
        assert sum(ours.scores) == pytest.approx(1.0, abs=1e-5)
        assert np.abs(np.subtract(ours.scores, reference.scores)).max() \
            <= common.CHECK_TOLERANCE["int8"]
        np.testing.assert_array_equal(again.predict(clip, "utterance", False).scores,
                                      first.predict(clip, "utterance", False).scores)


def test_a_recipe_change_is_a_new_cache_key():
    a = int8.recipe_key(SMALL, "tones")
    assert a == int8.recipe_key(int8.Recipe(clips=3, max_s=1.5), "tones")  # stable
    assert int8.recipe_key(int8.Recipe(clips=4, max_s=1.5), "tones") != a
    assert int8.recipe_key(SMALL, "espeak-ng 1.51") != a


def test_calibration_is_deterministic_and_normalised():
    for speech in ([True] if int8.espeak_version() else []) + [False]:
        first, second = (int8.calibration_clips(SMALL, speech) for _ in range(2))
        assert len(first) == SMALL.clips
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)
            assert 0 < len(a) <= SMALL.max_s * 16_000
        waveform, lengths = int8.graph_inputs(first[0], 16_000)
        assert waveform.shape == (1, max(16_000, len(first[0]))) and waveform.dtype == np.float32
        assert lengths.tolist() == [len(first[0])] and lengths.dtype == np.int64
        raw = torch.from_numpy(first[0])  # normalised as the engine does
        np.testing.assert_array_equal(waveform[0, :len(raw)],
                                      F.layer_norm(raw, raw.shape).numpy())
        assert not waveform[0, len(raw):].any()


def test_int8_beyond_its_bound_runs_openvino_reduced_and_says_why(tiny, cache, fp32,
                                                                   monkeypatch):
    monkeypatch.setitem(common.CHECK_TOLERANCE, "int8", 0.0)
    engine = _engine(tiny, cache, "int8")
    info = engine.info.backend_info
    assert engine.info.backend == "openvino" and info["requested"] == "openvino"
    assert info["precision"] in ("bf16", "f32")  # f32 only where the CPU has no bf16 units
    assert engine.info.dtype == {"bf16": "bfloat16", "f32": "float32"}[info["precision"]]
    assert "int8 refused" in info["note"] and "allowed 0" in info["note"]
    assert info["check_diff"] <= common.CHECK_TOLERANCE["reduced"]
    clip = _clips()[1]
    assert np.abs(np.subtract(engine.predict(clip, "utterance", False).scores,
                              fp32.predict(clip, "utterance", False).scores)).max() < 5e-3


def test_int8_that_cannot_quantise_runs_openvino_reduced(tiny, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no calibration today")

    monkeypatch.setattr(int8, "_quantize", broken)
    engine = _engine(tiny, tmp_path / "compiled", "int8")
    info = engine.info.backend_info
    assert engine.info.backend == "openvino" and info["precision"] in ("bf16", "f32")
    assert "int8 refused (no calibration today)" in info["note"]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_int8_is_openvino_only(backend):
    with pytest.raises(pydantic.ValidationError, match="int8 runs on backend openvino only"):
        ModelSettings(source="/m", backend=backend, precision="int8")
    settings = ModelSettings(source="/m", backend="openvino", precision="int8")
    assert settings.load_key() != ModelSettings(source="/m", backend="openvino",
                                                precision="reduced").load_key()


def test_int8_on_a_cpu_without_int8_units_runs_openvino_reduced(tiny, tmp_path, monkeypatch):
    """Without VNNI or AMX (here: the CPU's flags read without them) int8 is not tried."""
    flags = common.cpu_identity()["flags"].split()
    monkeypatch.setattr(int8, "cpu_identity", lambda: {
        "flags": " ".join(f for f in flags if f not in int8.INT8_FLAGS)})
    engine = _engine(tiny, tmp_path, "int8")
    info = engine.info.backend_info
    assert engine.info.backend == "openvino" and info["precision"] in ("bf16", "f32")
    assert "no int8 dot-product units" in info["note"]
    assert len(list(tmp_path.glob("*/encoder.xml"))) == 1  # the f32 IR: nothing quantised
