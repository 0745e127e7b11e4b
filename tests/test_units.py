"""Pieces without Ray: config, audio decoding, checkpoints, the engine's start-up errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from serve_app.audio import sndfile
from serve_app.checkpoints import generate
from serve_app.config import ModelSettings, RouterSettings
from serve_app.errors import ApiError
from serve_app.inference.engine import EmotionEngine, ModelLoadError
from serve_app.labels import english_name
from serve_app.traffic.routing import RoutingTable


def encode(samples, rate, fmt="WAV", subtype=None):
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def test_router_resolves_versions_and_rejects_bad_mappings():
    settings = RouterSettings(default_version="large", aliases={"latest": "large"})
    variants = ["base", "large", "turbo"]
    routes = RoutingTable(settings.default_version, settings.aliases, variants)
    assert routes.resolve(None).variant == "large"
    assert routes.resolve("latest").variant == "large"
    assert routes.resolve("base").variant == "base"
    assert routes.resolve("nope") is None
    with pytest.raises(ValueError, match="points to 'xl'"):
        RouterSettings(aliases={"big": "xl"}).check_against(variants)
    with pytest.raises(ValueError, match="default_version 'xl'"):
        RouterSettings(default_version="xl").check_against(variants)
    with pytest.raises(ValueError, match="hides the variant"):
        RouterSettings(aliases={"base": "large"}).check_against(variants)


def test_source_kind():
    assert not ModelSettings(source="iic/emotion2vec_plus_large").is_local
    assert ModelSettings(source="/models/e2v").is_local
    assert ModelSettings(source="~/e2v").is_local
    assert ModelSettings(source="./e2v").is_local


@pytest.mark.parametrize("source", ["iic/emotion2vec_plus_large",
                                    "emotion2vec/emotion2vec_plus_base"])
def test_generate_with_a_hub_id_is_refused(source):
    """`generate` beside a hub id would write random weights under the hub id's name."""
    with pytest.raises(ValueError, match="looks like a hub id.*remove `generate`"):
        ModelSettings(source=source, generate={"arch": "large"})
    assert not ModelSettings(source=source).is_local  # without generate: the hub's weights
    for path in (f"./{source}", f"~/{source}", f"/models/{source}"):
        assert ModelSettings(source=path, generate={"arch": "large"}).is_local


def test_decode_downmixes_and_resamples():
    t = np.arange(44_100) / 44_100
    left, right = np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t + np.pi)
    stereo = np.stack([left, right], axis=1).astype(np.float32) * 0.5
    decoded = sndfile.decode(encode(stereo, 44_100, "FLAC"), max_duration_s=10, min_duration_s=0.1)
    assert (decoded.sample_rate, decoded.channels, decoded.format) == (44_100, 2, "FLAC")
    assert decoded.waveform.dtype == np.float32 and decoded.waveform.ndim == 1
    assert len(decoded.waveform) == 16_000
    assert np.abs(decoded.waveform).max() < 1e-3  # opposite phases cancel: a real downmix

    tone = (np.sin(2 * np.pi * 300 * np.arange(48_000) / 48_000) * 0.5).astype(np.float32)
    decoded = sndfile.decode(encode(tone, 48_000), max_duration_s=10, min_duration_s=0.1)
    assert len(decoded.waveform) == 16_000
    spectrum = np.abs(np.fft.rfft(decoded.waveform))
    assert abs(int(np.argmax(spectrum)) - 300) <= 1  # the 300 Hz tone survives resampling


def test_decode_keeps_16k_mono_exactly():
    samples = (np.random.default_rng(0).standard_normal(8000) * 0.1).astype(np.float32)
    data = encode(samples, 16_000, subtype="FLOAT")
    np.testing.assert_array_equal(
        sndfile.decode(data, max_duration_s=10, min_duration_s=0.1).waveform, samples)


@pytest.mark.parametrize("data,status,code", [
    (b"", 422, "empty_audio"),
    (b"RIFF....WAVEfmt garbage", 415, "unsupported_audio"),
    (encode(np.zeros(800, np.float32), 16_000), 422, "audio_too_short"),
    (encode(np.zeros(16_000 * 11, np.float32), 16_000), 413, "audio_too_long"),
    (encode(np.array([0.0, np.nan] * 4000, np.float32), 16_000, subtype="FLOAT"), 422,
     "invalid_samples"),
])
def test_decode_rejects(data, status, code):
    with pytest.raises(ApiError) as caught:
        sndfile.decode(data, max_duration_s=10, min_duration_s=0.1)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_english_names():
    assert [english_name(t) for t in generate.TOKENS] == [
        "angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised",
        "unknown"]


def test_missing_local_directory_is_a_fast_clear_error(tmp_path):
    engine = EmotionEngine(ModelSettings(source=str(tmp_path / "nowhere")), "cpu", 1)
    # Refused before FunASR is asked: a missing path is never taken for a hub id.
    with pytest.raises(ModelLoadError, match="does not exist.*generate"):
        engine.load()

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.yaml").write_text("model: Emotion2vec\n")
    with pytest.raises(ModelLoadError, match="lacks model.pt, tokens.txt"):
        EmotionEngine(ModelSettings(source=str(partial)), "cpu", 1).load()


def test_engine_generates_a_missing_checkpoint_when_asked(tmp_path):
    settings = ModelSettings(source=str(tmp_path / "gen"), generate={"arch": "tiny", "seed": 7})
    engine = EmotionEngine(settings, "cpu", 1)
    info = engine.load()
    assert info.weights == "random" and info.random_weights["seed"] == 7
    result = engine.predict(np.zeros(16_000, np.float32), "utterance", False)
    assert len(result.scores) == 9 and abs(sum(result.scores) - 1) < 1e-6
