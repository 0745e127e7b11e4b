"""Fidelity of the compiled backend on the tiny model, over varied clips: fp32 equals FunASR's
`generate`, and reduced precision (turbo) stays within the bounds turbo is held to. Each run
reports top-1 agreement and the smallest top-1 margin: a random-weight head gives nearly flat
scores, and agreement on clips whose two best scores nearly tie says little."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.checkpoints import generate
from serve_app.config import ModelSettings
from serve_app.inference import backends
from serve_app.inference.engine import EmotionEngine
from tests import clips as clip_maker

pytest.importorskip("openvino")

RATE = 16_000
SCORE_BOUND = {"fp32": 1e-5, "reduced": 2e-3}
COSINE_BOUND = 0.9999


def varied_clips() -> list[np.ndarray]:
    """24 clips, 0.2-2.9 s: tones, chords, chirps, noise (white and brown), bursts, silence with
    a tone, clipped and quiet ones; lengths multiples of nothing."""
    rng = np.random.default_rng(21)
    made = []
    for i in range(24):
        seconds = 0.2 + (i * 0.37) % 2.7
        n = int(seconds * RATE) + 7 * i + 1
        t = np.arange(n) / RATE
        kind = i % 8
        if kind == 0:
            clip = clip_maker.tone(n / RATE, RATE, 90.0 + 37 * i, i)[:n]
        elif kind == 1:
            clip = sum(np.sin(2 * np.pi * f * t) for f in (110 * (1 + i % 3), 330, 550)) / 3
        elif kind == 2:
            clip = np.sin(2 * np.pi * (100 + 400 * t / t[-1]) * t)  # a chirp
        elif kind == 3:
            clip = rng.standard_normal(n) * 0.3
        elif kind == 4:
            clip = np.cumsum(rng.standard_normal(n))
            clip = clip / np.abs(clip).max()
        elif kind == 5:
            clip = rng.standard_normal(n) * (np.sin(2 * np.pi * 3 * t) > 0.5)  # bursts
        elif kind == 6:
            clip = np.zeros(n)
            clip[n // 3:] = 0.5 * np.sin(2 * np.pi * 240 * t[n // 3:])
        else:
            clip = np.clip(2.5 * np.sin(2 * np.pi * 180 * t), -1, 1) * (0.01 if i % 2 else 1)
        made.append(np.asarray(clip, dtype=np.float32))
    return made


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("fidelity-ckpt") / "tiny-seed5"
    generate.write_checkpoint(path, "tiny", 5)
    return path


@pytest.fixture(scope="module")
def engines(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("fidelity-compiled")
    made = {}
    for precision in ("fp32", "reduced"):
        engine = EmotionEngine(ModelSettings(source=str(tiny), backend="openvino",
                                             precision=precision, window_s=3.0,
                                             compiled_cache_dir=str(cache)), "cpu", 1)
        engine.load()
        assert engine.info.backend == "openvino", engine.info.backend_info
        made[precision] = engine
    return made


def compare(reference: list[dict], candidate: list[dict]) -> dict:
    """Largest score difference, smallest embedding cosine, top-1 agreement and the smallest
    top-1 margin of the reference (how far its best score is from its second)."""
    diffs, cosines, agree, margins = [], [], 0, []
    for ref, got in zip(reference, candidate):
        a, b = np.asarray(ref["scores"]), np.asarray(got["scores"])
        diffs.append(float(np.abs(a - b).max()))
        x, y = np.asarray(ref["feats"], np.float64), np.asarray(got["feats"], np.float64)
        cosines.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
        agree += int(a.argmax() == b.argmax())
        top = np.sort(a)[::-1]
        margins.append(float(top[0] - top[1]))
    return {"clips": len(reference), "max_score_diff": max(diffs),
            "min_cosine": min(cosines), "top1_agreement": agree,
            "min_top1_margin": min(margins), "diffs": diffs, "margins": margins}


def _ours(engine: EmotionEngine, clips: list[np.ndarray]) -> list[dict]:
    out = []
    for clip in clips:
        p = engine.predict(clip, "utterance", extract_embedding=True)
        out.append({"scores": p.scores, "feats": p.embedding})
    return out


def test_fp32_compiled_equals_funasr_generate_on_varied_clips(engines, tiny, funasr_models,
                                                              record_property):
    auto = funasr_models(tiny)
    clips = varied_clips()
    reference = [auto.generate(c, granularity="utterance", extract_embedding=True)[0]
                 for c in clips]
    report = compare(reference, _ours(engines["fp32"], clips))
    record_property("fp32_vs_funasr", {k: v for k, v in report.items()
                                       if k not in ("diffs", "margins")})
    print("fp32 openvino vs FunASR generate:", report["max_score_diff"], report["min_cosine"],
          f"top-1 {report['top1_agreement']}/{report['clips']}",
          "min margin", report["min_top1_margin"])
    assert report["max_score_diff"] <= SCORE_BOUND["fp32"]
    assert report["min_cosine"] >= 1 - 1e-6
    assert report["top1_agreement"] == report["clips"]


def test_reduced_precision_within_turbo_bounds_of_fp32(engines, record_property):
    clips = varied_clips()
    assert len(clips) >= 20
    reference, turbo = _ours(engines["fp32"], clips), _ours(engines["reduced"], clips)
    report = compare(reference, turbo)
    record_property("reduced_vs_fp32", {k: v for k, v in report.items()
                                        if k not in ("diffs", "margins")})
    print(f"reduced ({engines['reduced'].info.dtype}) openvino vs fp32:",
          report["max_score_diff"], report["min_cosine"],
          f"top-1 {report['top1_agreement']}/{report['clips']}",
          "min margin", report["min_top1_margin"])
    bf16 = backends.has_bf16()
    assert engines["reduced"].info.dtype == ("bfloat16" if bf16 else "float32")
    assert report["max_score_diff"] <= SCORE_BOUND["reduced"]
    assert report["min_cosine"] >= COSINE_BOUND
    # Top-1 may only change where fp32's two best scores are closer than the error allows.
    for ref, got, diff, margin in zip(reference, turbo, report["diffs"], report["margins"]):
        if margin > 2 * diff:
            assert np.argmax(ref["scores"]) == np.argmax(got["scores"])
    if bf16:  # really reduced: not fp32 under another name
        assert report["max_score_diff"] > 1e-7
    else:  # no bf16 units: f32, and the note says so
        assert "no bf16 units" in engines["reduced"].info.backend_info["note"]
