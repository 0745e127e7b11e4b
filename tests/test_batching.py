"""predict_batch: one padded forward pass gives each clip what predict gives it alone.

In-process, no Ray, on a tiny random-weight checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.checkpoints import generate
from serve_app.config import ModelSettings
from serve_app.inference import padded
from serve_app.inference.engine import EmotionEngine, Prediction

RATE = 16_000
# 0.3 s, 1 s, 2.7 s + 10 samples, 5 s, and 1.0077 s: not all multiples of the 320x stride.
LENGTHS = [4_800, RATE, 43_210, 80_000, 16_123]
FP32_TOLERANCE = 1e-4


def make_clips(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    """Distinct clips: a tone whose pitch differs per clip, plus noise."""
    rng = np.random.default_rng(seed)
    clips = []
    for i, n in enumerate(lengths):
        t = np.arange(n) / RATE
        tone = 0.3 * np.sin(2 * np.pi * (150 + 90 * i) * t)
        clips.append((tone + 0.05 * rng.standard_normal(n)).astype(np.float32))
    return clips


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return generate.write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=5)


def load(checkpoint, precision: str) -> EmotionEngine:
    engine = EmotionEngine(ModelSettings(source=str(checkpoint), precision=precision), "cpu", 1)
    engine.load()
    assert engine._batchable
    return engine


@pytest.fixture(scope="module")
def fp32(checkpoint) -> EmotionEngine:
    return load(checkpoint, "fp32")


@pytest.fixture(scope="module")
def reduced(checkpoint) -> EmotionEngine:
    return load(checkpoint, "reduced")


def max_diffs(batched: list[Prediction], single: list[Prediction]) -> tuple[float, float]:
    """Largest score and embedding differences; shapes must match exactly."""
    assert len(batched) == len(single)
    scores = embedding = 0.0
    for b, s in zip(batched, single):
        assert b.labels == s.labels
        assert len(b.scores) == len(s.scores)
        scores = max(scores, float(np.max(np.abs(np.subtract(b.scores, s.scores)))))
        assert (b.embedding is None) == (s.embedding is None)
        if s.embedding is not None:
            assert b.embedding.shape == s.embedding.shape
            embedding = max(embedding, float(np.max(np.abs(b.embedding - s.embedding))))
    return scores, embedding


@pytest.mark.parametrize("granularity", ["utterance", "frame"])
@pytest.mark.parametrize("extract_embedding", [True, False])
def test_fp32_batch_equals_single_clips(fp32, granularity, extract_embedding):
    clips = make_clips(LENGTHS)
    single = [fp32.predict(c, granularity, extract_embedding) for c in clips]
    batched = fp32.predict_batch(clips, granularity, extract_embedding)
    scores, embedding = max_diffs(batched, single)
    assert scores <= FP32_TOLERANCE and embedding <= FP32_TOLERANCE, (scores, embedding)
    for b in batched:
        assert abs(sum(b.scores) - 1) < 1e-5
    if extract_embedding and granularity == "frame":
        # Each clip's own frames (a 400-sample window every 320 samples), none of the padding.
        frames = [b.embedding.shape[0] for b in batched]
        assert frames == [(n - 400) // 320 + 1 for n in LENGTHS] == [14, 49, 134, 249, 50]
        assert all(b.embedding.shape[1] == 64 for b in batched)


def test_frame_lengths_match_the_conv_feature_extractor(fp32):
    import torch

    local_encoder = fp32.model.modality_encoders["AUDIO"].local_encoder
    lengths = [400, 401, 719, 720, 1039, 4_800, 16_123]
    with torch.inference_mode():
        actual = [local_encoder(torch.zeros(1, n)).shape[-1] for n in lengths]
    assert padded.frame_lengths(fp32.model, torch.tensor(lengths)).tolist() == actual


def test_batch_of_one_and_equal_lengths(fp32):
    clip = make_clips([43_210])[0]
    for clips in ([clip], [clip, clip[::-1].copy()]):
        single = [fp32.predict(c, "frame", True) for c in clips]
        scores, embedding = max_diffs(fp32.predict_batch(clips, "frame", True), single)
        assert scores <= FP32_TOLERANCE and embedding <= FP32_TOLERANCE


def test_results_follow_input_order(fp32):
    clips = make_clips(LENGTHS, seed=1)
    forward = fp32.predict_batch(clips, "utterance", True)
    backward = fp32.predict_batch(clips[::-1], "utterance", True)
    scores, embedding = max_diffs(backward[::-1], forward)
    assert scores <= FP32_TOLERANCE and embedding <= FP32_TOLERANCE
    # The clips are told apart: a result matches its own clip, not a neighbour's.
    first = fp32.predict(clips[0], "utterance", True).embedding
    assert np.abs(forward[0].embedding - first).max() <= FP32_TOLERANCE
    assert np.abs(forward[1].embedding - first).max() > 100 * FP32_TOLERANCE


def test_reduced_precision_batch_is_close_to_single_clips(reduced):
    clips = make_clips(LENGTHS, seed=2)
    single = [reduced.predict(c, "utterance", True) for c in clips]
    batched = reduced.predict_batch(clips, "utterance", True)
    scores, embedding = max_diffs(batched, single)
    assert scores <= 1e-2, scores
    assert embedding <= 0.1, embedding  # bf16 keeps ~3 significant digits


def test_alibi_cache_does_not_grow_with_batch_size(fp32):
    fp32.predict_batch(make_clips([80_000] * 3), "utterance", False)
    heads = fp32.model.modality_encoders["AUDIO"].modality_cfg.num_alibi_heads
    cached = list(fp32.model.alibi_biases.values())
    assert cached and all(bias.size(0) == heads for bias in cached)


def test_empty_and_too_short(fp32):
    assert fp32.predict_batch([], "utterance", False) == []
    with pytest.raises(ValueError, match=r"clips \[1\]"):
        fp32.predict_batch(make_clips([RATE, 399]), "utterance", False)


def test_long_clips_run_in_windows_that_equal_funasr_per_window(tmp_path):
    """Past window_s a clip runs window by window; each window's frames are FunASR's frames
    for that piece, and the utterance result pools all frames."""
    from funasr import AutoModel

    directory = generate.write_checkpoint(tmp_path / "w", "tiny", seed=5)
    engine = EmotionEngine(ModelSettings(source=str(directory), window_s=2.0), "cpu", 1)
    engine.load()
    rng = np.random.default_rng(0)
    clip = (rng.standard_normal(int(16_000 * 5.3)) * 0.1).astype(np.float32)
    result = engine.predict(clip, "frame", True)
    pieces = [clip[:32_000], clip[32_000:64_000], clip[64_000:]]  # 2 s, 2 s, 1.3 s
    funasr = AutoModel(model=str(directory), device="cpu", ncpu=1, disable_update=True,
                       disable_pbar=True)
    expected = np.concatenate([funasr.generate(p, granularity="frame", extract_embedding=True)
                               [0]["feats"] for p in pieces])
    np.testing.assert_allclose(result.embedding, expected, atol=1e-5, rtol=0)
    utterance = engine.predict(clip, "utterance", True)
    np.testing.assert_allclose(utterance.embedding, expected.mean(axis=0), atol=1e-5)
    assert abs(sum(utterance.scores) - 1) < 1e-5
    # A clip within the window is FunASR's whole-clip result, untouched.
    short = clip[:30_000]
    np.testing.assert_allclose(engine.predict(short, "utterance", False).scores,
                               funasr.generate(short)[0]["scores"], atol=1e-6)
    # A last piece under a second joins the window before it.
    assert [len(w) for w in engine._windows(clip[:int(16_000 * 4.5)])] == [32_000, 40_000]
