"""The emotion timeline as a pure function, and through the engine on a tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_app.config import ModelSettings
from serve_app.inference.engine import EmotionEngine
from serve_app.inference.heads import masked_scores
from serve_app.inference.timeline import emotion_timeline, to_frames, window_bounds
from tests.clips import tone


@pytest.mark.parametrize("n, window, hop, expected", [
    (100, 50, 25, [(0, 50), (25, 75), (50, 100)]),          # the last window ends on the clip
    (110, 50, 25, [(0, 50), (25, 75), (50, 100), (75, 110)]),  # the last one is partial
    (30, 50, 25, [(0, 30)]),                                # shorter than a window: one window
    (50, 50, 25, [(0, 50)]),
    (7, 2, 3, [(0, 2), (3, 5), (6, 7)]),                    # hop over window leaves gaps
    (1, 50, 25, [(0, 1)]),
    (0, 50, 25, []),
])
def test_window_bounds(n, window, hop, expected):
    assert window_bounds(n, window, hop) == expected


def test_window_bounds_refuses_empty_windows():
    with pytest.raises(ValueError):
        window_bounds(10, 0, 1)


def scorer(head, keep):
    """The checkpoint head's way of scoring pooled windows (serve_app/inference/heads.py)."""
    return lambda pooled: masked_scores(head(pooled), [keep] * len(pooled))


@pytest.fixture
def head():
    torch.manual_seed(0)
    return torch.nn.Linear(16, 9)


def test_times_scores_and_mask(head):
    frames = torch.randn(260, 16)  # 5.2 s at 50 frames a second
    keep = [0, 1, 3, 4, 5, 6, 7, 8]  # class 2 masked
    timeline = emotion_timeline(frames, scorer(head, keep), window_s=1.0, hop_s=0.5)
    assert [(w["start_s"], w["end_s"]) for w in timeline] == [
        (0.0, 1.0), (0.5, 1.5), (1.0, 2.0), (1.5, 2.5), (2.0, 3.0), (2.5, 3.5), (3.0, 4.0),
        (3.5, 4.5), (4.0, 5.0), (4.5, 5.2)]
    for window in timeline:
        assert len(window["scores"]) == len(window["logits"]) == 8  # the masked one left out
        assert sum(window["scores"]) == pytest.approx(1.0, abs=1e-6)
    # Each window is the head on the mean of exactly its frames, softmax over the kept classes.
    logits = head(frames[25:75].mean(dim=0))
    got = timeline[1]
    assert got["scores"] != pytest.approx(timeline[0]["scores"])
    assert got["logits"] == pytest.approx(logits[keep].tolist(), abs=1e-6)
    assert got["scores"] == pytest.approx(torch.softmax(logits[keep], dim=-1).tolist(), abs=1e-6)


def test_a_window_over_the_whole_clip_is_the_utterance(head):
    frames = torch.randn(73, 16)
    (only,) = emotion_timeline(frames, scorer(head, range(9)), window_s=10.0, hop_s=5.0)
    assert (only["start_s"], only["end_s"]) == (0.0, 1.46)
    utterance = torch.softmax(head(frames.mean(dim=0, keepdim=True)), dim=-1)[0].tolist()
    assert only["scores"] == pytest.approx(utterance, abs=1e-7)


def test_engine_timeline_matches_its_utterance_scores(tmp_path):
    settings = ModelSettings(source=str(tmp_path / "tiny"), generate={"arch": "tiny", "seed": 3},
                             timeline_window_s=30.0, timeline_hop_s=30.0, threads=1)
    engine = EmotionEngine(settings, "cpu", 1)
    engine.load()
    clip = tone(2.0, 16_000)
    utterance = engine.predict(clip, "utterance", False)
    frame = engine.predict(clip, "frame", True)
    assert utterance.timeline is None
    (whole,) = frame.timeline
    assert whole["start_s"] == 0.0 and whole["end_s"] == pytest.approx(len(frame.embedding) / 50)
    np.testing.assert_allclose(whole["scores"], utterance.scores, atol=1e-6)

    short = EmotionEngine(settings.model_copy(update={"timeline_window_s": 0.5,
                                                      "timeline_hop_s": 0.3}), "cpu", 1)
    short.load()
    n_frames = len(short.predict(clip, "frame", True).embedding)
    windows = short.predict(clip, "frame", False).timeline
    assert [(w["start_s"], w["end_s"]) for w in windows] == [
        (s / 50, e / 50) for s, e in window_bounds(n_frames, 25, 15)]
    assert windows[1]["start_s"] == 0.3 and windows[-1]["end_s"] == n_frames / 50
    assert len({tuple(w["scores"]) for w in windows}) == len(windows)


def test_seconds_round_to_whole_frames():
    assert [to_frames(s) for s in (0.25, 0.5, 1.0, 0.001)] == [13, 25, 50, 1]


def test_timeline_over_http(client, clips):
    clip = clips["tone_5s_16k_wav"]
    with open(clip, "rb") as handle:
        response = client.post("/v1/predict", files={"file": (clip.name, handle)},
                               data={"model_version": "base", "granularity": "frame"})
    assert response.status_code == 200, response.text
    body = response.json()
    timeline = body["timeline"]
    # 5 s with the default 1 s window and 0.5 s hop: starts 0, 0.5, ..., 4.0 (4.0 + 1 s reaches
    # the last frame, a little before 5 s).
    assert [w["start_s"] for w in timeline] == [i / 2 for i in range(9)]
    assert all(w["end_s"] == pytest.approx(w["start_s"] + 1.0) for w in timeline[:-1])
    assert 4.9 <= timeline[-1]["end_s"] <= 5.0
    for window in timeline:
        assert list(window["scores"]) == list(body["scores"])
        assert sum(window["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert window["emotion"] == max(window["scores"], key=window["scores"].get)
        assert window["confidence"] == window["scores"][window["emotion"]]
    # The utterance result stays FunASR's, and utterance answers carry no timeline.
    with open(clip, "rb") as handle:
        plain = client.post("/v1/predict", files={"file": (clip.name, handle)},
                            data={"model_version": "base"}).json()
    assert "timeline" not in plain
    assert plain["scores"] == pytest.approx(body["scores"], abs=1e-6)
