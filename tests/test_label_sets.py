"""Label sets: parsing and validation (pure), the masked softmax, and the engine against
FunASR's own masking (a checkpoint whose tokens.txt marks the other labels "unuse"). In-process,
no Ray, on a tiny random-weight checkpoint."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from serve_app import labels as label_sets
from serve_app.checkpoints import generate, weights
from serve_app.config import ModelSettings
from serve_app.errors import ApiError
from serve_app.inference.engine import EmotionEngine
from serve_app.inference.heads import masked_scores
from tests.clips import tone

PUBLISHED = ["生气/angry", "厌恶/disgusted", "恐惧/fearful", "开心/happy", "中立/neutral",
             "其他/other", "难过/sad", "吃惊/surprised", "<unk>"]
FOUR = ("angry", "happy", "neutral", "sad")


@pytest.mark.parametrize("value, expected", [
    ("angry,happy,neutral,sad", FOUR),
    (" Sad , angry,,happy ,neutral,", ("sad", "angry", "happy", "neutral")),
    (["开心/happy", "<unk>", "happy"], ("happy", "unknown")),  # FunASR's tokens; repeats once
    ("", None), (" , ", None), (None, None), ([], None),
])
def test_parse_label_set(value, expected):
    assert label_sets.parse_label_set(value) == expected


@pytest.mark.parametrize("value", ["a," * 600, 7, ["happy", 3], {"happy": 1}])
def test_parse_label_set_refuses(value):
    with pytest.raises(ApiError) as caught:
        label_sets.parse_label_set(value)
    assert (caught.value.status, caught.value.code) == (422, "invalid_parameter")


def test_select_keeps_head_order_and_leaves_out_unused_labels():
    labels = [*PUBLISHED[:5], "unuse_0", *PUBLISHED[5:]]
    assert label_sets.select(("sad", "angry"), labels) == (0, 7)
    assert label_sets.select(None, labels) == (0, 1, 2, 3, 4, 6, 7, 8, 9)
    assert "unuse_0" not in label_sets.valid_names(labels)
    with pytest.raises(label_sets.UnknownLabel) as caught:
        label_sets.select(("happy", "bored", "unuse_0"), labels)
    error = caught.value.api_error()
    assert (error.status, error.code) == (400, "unknown_label")
    assert error.body()["error"]["valid"] == ["angry", "disgusted", "fearful", "happy",
                                              "neutral", "other", "sad", "surprised", "unknown"]
    assert "'bored'" in error.message and "'unuse_0'" in error.message
    # It crosses Ray (pickled in a task error) with what the router needs.
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.unknown, copy.valid) == (caught.value.unknown, caught.value.valid)


def test_masked_scores_mask_before_the_softmax_per_row():
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0], [0.5, -4.0, 2.0, 9.0]])
    (first, second) = masked_scores(logits, [(0, 2), (0, 1, 2, 3)])
    funasr_way = logits[0].clone()
    funasr_way[[1, 3]] = float("-inf")
    assert first[0] == pytest.approx(torch.softmax(funasr_way, -1)[[0, 2]].tolist(), abs=1e-7)
    assert first[1] == [1.0, 3.0]  # raw logits of the set only: never -inf
    assert second[0] == pytest.approx(torch.softmax(logits[1], -1).tolist(), abs=1e-7)
    assert sum(first[0]) == pytest.approx(1.0, abs=1e-6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return generate.write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=7)


@pytest.fixture(scope="module")
def engine(checkpoint) -> EmotionEngine:
    engine = EmotionEngine(ModelSettings(source=str(checkpoint), timeline_window_s=1.0,
                                         timeline_hop_s=0.5), "cpu", 1)
    engine.load()
    return engine


def test_engine_label_set_is_funasrs_unused_label_mask(engine, checkpoint, tmp_path,
                                                       funasr_models):
    """FunASR masks a label whose token starts with "unuse": the same checkpoint with every
    label outside the set renamed so must score as the engine's label set does. (FunASR's
    tokenizer needs "<unk>" in its list: it stays, and so is in the set.)"""
    wanted = (*FOUR, "unknown")
    masked = tmp_path / "masked"
    shutil.copytree(checkpoint, masked)
    tokens = weights.read_labels(masked / "tokens.txt")
    renamed = [t if label_sets.english_name(t) in wanted else f"unuse_{i}"
               for i, t in enumerate(tokens)]
    (masked / "tokens.txt").write_text("\n".join(renamed), encoding="utf-8")
    clip = tone(2.0, 16_000, freq=180.0)

    expected = funasr_models(masked).generate(clip, granularity="utterance")[0]
    got = engine.predict(clip, "utterance", False, labels=wanted[::-1])
    assert got.labels == expected["labels"] == ["生气/angry", "开心/happy", "中立/neutral",
                                                "难过/sad", "<unk>"]
    np.testing.assert_allclose(got.scores, expected["scores"], atol=1e-5)
    # The logits are the head's, unmasked: the full prediction's softmax comes from them too.
    full = engine.predict(clip, "utterance", False)
    assert len(full.labels) == len(full.logits) == 9
    keep = [full.labels.index(label) for label in got.labels]
    np.testing.assert_allclose(got.logits, np.asarray(full.logits)[keep], atol=1e-6)
    np.testing.assert_allclose(full.scores, torch.softmax(torch.tensor(full.logits), -1),
                               atol=1e-6)


def test_engine_timeline_and_batches_with_mixed_label_sets(engine):
    clips = [tone(1.3, 16_000, freq=150.0), tone(3.1, 16_000, freq=300.0, seed=1),
             tone(2.0, 16_000, freq=220.0, seed=2)]
    sets = [FOUR, None, ("surprised",)]
    batched = engine.predict_batch(clips, "frame", True, labels=sets)
    for clip, names, got in zip(clips, sets, batched):
        alone = engine.predict(clip, "frame", True, labels=names)
        assert got.labels == alone.labels
        assert len(got.labels) == (len(names) if names else 9)
        np.testing.assert_allclose(got.scores, alone.scores, atol=1e-5)
        np.testing.assert_allclose(got.logits, alone.logits, atol=1e-4)
        assert len(got.timeline) == len(alone.timeline) > 1
        for window in got.timeline:
            assert len(window["scores"]) == len(window["logits"]) == len(got.labels)
    assert batched[2].scores == [1.0]  # one label: the softmax over it alone


def test_engine_refuses_an_unknown_label_before_any_work(engine):
    with pytest.raises(label_sets.UnknownLabel) as caught:
        engine.predict(np.zeros(10, np.float32), "utterance", False, labels=("bored",))
    assert caught.value.valid[:2] == ["angry", "disgusted"]
    with pytest.raises(label_sets.UnknownLabel):
        engine.predict_batch([tone(1.0, 16_000)] * 2, "utterance", False,
                             labels=[None, ("joy",)])


def test_engine_reports_what_v1_models_shows(engine):
    info = engine.info
    assert info.labels == ["angry", "disgusted", "fearful", "happy", "neutral", "other", "sad",
                           "surprised", "unknown"]
    assert info.embedding_dim == 64 and info.sample_rate == 16_000  # tiny: embed_dim 64
    assert info.parameter_count == sum(p.numel() for p in engine.model.parameters()) > 100_000
    assert len(info.sha256) == 64
