"""`emotion2vec-serve heads train` and `heads evaluate` on a corpus made here with espeak-ng
(tests/heads_corpus.py): three classes that differ in how they are spoken (low and slow, high
and fast, whispered), six voices, each voice with two texts of its own, so that grouping by
voice holds out voices and texts together. The backbone is the tiny generated checkpoint
(random weights): pitch, rate and breath still show in its embeddings. Embeddings come from the
batch job's stages on the session's cluster (a quarter CPU for the engine); scikit-learn fits
the heads."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml

from serve_app.heads import data as datasets
from serve_app.heads import embeddings
from serve_app.heads.headfile import decode
from serve_app.heads.registry import HeadRegistry
from serve_app.tools.batch.plan import plan_job
from serve_app.tools.cli import main
from serve_app.tools.cluster import load_app
from tests.clips import espeak_available
from tests.conftest import TINY_CONFIG
from tests.heads_corpus import CLASSES, make_corpus

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

FOLDS = 3
SMALL = ("--num-cpus", "0.25")  # the engine's share of the session's 2-CPU cluster
# Measured on this corpus (tiny seed 1, 3 folds by voice): UA 0.806 (folds 0.75-0.875); the
# head's own shuffled-label control 0.431 and the shuffled manifest 0.333 (chance 0.333; with
# 72 clips a shuffled UA spreads by about +-0.06). Thresholds with that spread as margin.
MIN_UA, MAX_CONTROL_UA = 0.7, 0.55


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """label/voice/clip.wav: 3 labels x 6 voices x 2 texts x 2 pitches = 72 clips of ~1 s."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """The tiny config; its base variant (a generated checkpoint) computes the embeddings."""
    folder = tmp_path_factory.mktemp("config")
    app = load_app(TINY_CONFIG, folder / "checkpoints")
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedding-cache")


def heads(*args: str) -> tuple[int, str, str]:
    """`emotion2vec-serve heads ...` in this process (it uses the session's cluster)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["heads", *args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(cluster, corpus, config, cache, tmp_path_factory):
    heads_dir = tmp_path_factory.mktemp("heads")
    done = heads("train", str(corpus), "--name", "voices", "--group-by", "folder", "--folds",
                 str(FOLDS), "--config", str(config), "--model-version", "base",
                 "--heads-dir", str(heads_dir), "--cache-dir", str(cache), *SMALL)
    return done, heads_dir


def read_head(heads_dir: Path, revision: int = 1):
    return decode((heads_dir / "voices" / f"{revision}.safetensors").read_bytes(), 2**24)


def test_cross_validated_ua_holds_out_voices_and_texts(trained, config):
    (code, out, err), heads_dir = trained
    assert code == 0, err
    head = read_head(heads_dir)
    meta = head.metadata
    overall, folds = meta["metrics"]["overall"], meta["metrics"]["folds"]
    assert overall["ua"] >= MIN_UA, out
    assert meta["metrics"]["control"]["ua"] <= MAX_CONTROL_UA, out
    assert len(folds) == FOLDS and sum(fold["clips"] for fold in folds) == 72
    assert all(fold["ua"] > 1 / 3 for fold in folds), out
    assert sum(map(sum, overall["confusion"]["matrix"])) == 72
    assert 0 <= overall["ece_after"] <= 1 and 0 <= overall["ece_before"] <= 1
    training = meta["training"]
    assert training["group_by"] == "folder" and training["folds"] == FOLDS
    assert training["clips_per_label"] == {"high-fast": 24, "low-slow": 24, "whisper": 24}
    assert training["embedding_cache"] == {"hits": 0, "extracted": 72}
    assert training["libraries"]["scikit-learn"] and training["skipped"] == []
    plan = plan_job(config, "base")
    checkpoint = Path(plan.model.source) / "model.pt"
    assert meta["backbone"]["sha256"] == embeddings.file_sha256(checkpoint)
    assert (meta["backbone"]["arch"], head.embedding_dim) == ("tiny", 64)
    assert head.labels == ["high-fast", "low-slow", "whisper"]
    for text in ("fold 3: UA", "overall: UA", "shuffled-label control: UA", "temperature",
                 "stored as voices@1", "72 clips, 0 from the cache, 72 extracted"):
        assert text in out, out
    assert "scoring 72 files with base" in err  # the batch job ran


def _embeddings_in_training_order(corpus: Path, config: Path, cache: Path):
    """The cached embeddings and labels in the order train reads the folders."""
    clips = datasets.read(corpus, "folder").clips
    backbone = embeddings.backbone(plan_job(config, "base"), cache)
    store = embeddings.EmbeddingCache(cache, backbone["sha256"], "fp32")
    X = np.stack([store.get((embeddings.file_sha256(c.path), None, None)) for c in clips])
    return X, np.array([c.label for c in clips])


def test_head_equals_sklearn_and_a_second_run_decodes_nothing(trained, corpus, config, cache):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _, heads_dir = trained
    code, out, err = heads("train", str(corpus), "--name", "voices", "--group-by", "folder",
                           "--folds", str(FOLDS), "--config", str(config), "--model-version",
                           "base", "--heads-dir", str(heads_dir), "--cache-dir", str(cache),
                           *SMALL)
    assert code == 0, err
    assert "72 clips, 72 from the cache, 0 extracted" in out and "scoring" not in err
    second = read_head(heads_dir, 2)
    assert second.metadata["training"]["embedding_cache"] == {"hits": 72, "extracted": 0}
    assert HeadRegistry(str(heads_dir), 2**24).revisions("voices") == [1, 2]
    X, labels = _embeddings_in_training_order(corpus, config, cache)
    estimator = make_pipeline(StandardScaler(), LogisticRegression(
        class_weight="balanced", max_iter=1000)).fit(X.astype(np.float64), labels)
    assert list(estimator.classes_) == second.labels
    assert np.abs(second.logits(X) - estimator.decision_function(X)).max() <= 1e-5
    assert second.metadata["metrics"] == read_head(heads_dir, 1).metadata["metrics"]


def test_shuffled_labels_stay_near_chance(trained, corpus, config, cache, tmp_path):
    """The control through the whole command: the same clips and groups, labels shuffled."""
    clips = datasets.read(corpus, "folder").clips
    shuffled = np.random.default_rng(7).permutation([clip.label for clip in clips])
    manifest = tmp_path / "shuffled.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        writer.writerows([c.path, label, c.group] for c, label in zip(clips, shuffled))
    code, out, err = heads("train", str(manifest), "--name", "shuffled", "--folds", str(FOLDS),
                           "--config", str(config), "--model-version", "base", "--out",
                           str(tmp_path / "shuffled.safetensors"), "--cache-dir", str(cache))
    assert code == 0, err
    meta = decode((tmp_path / "shuffled.safetensors").read_bytes(), 2**24).metadata
    assert meta["training"]["group_by"] == "group"  # a manifest's group column by default
    assert meta["metrics"]["overall"]["ua"] <= MAX_CONTROL_UA, out
    assert meta["training"]["embedding_cache"]["extracted"] == 0


@pytest.mark.parametrize("kind", ["mlp", "prototype"])
def test_other_kinds_convert_exactly(trained, corpus, config, cache, tmp_path, kind):
    out_file = tmp_path / f"{kind}.safetensors"
    code, _, err = heads("train", str(corpus), "--name", kind, "--kind", kind, "--group-by",
                           "folder", "--folds", str(FOLDS), "--config", str(config),
                           "--model-version", "base", "--out", str(out_file), "--cache-dir",
                           str(cache))
    assert code == 0, err
    head = decode(out_file.read_bytes(), 2**24)
    assert head.kind == kind and head.metadata["training"]["conversion_max_difference"] <= 1e-5
    X, labels = _embeddings_in_training_order(corpus, config, cache)
    predicted = np.array(head.labels)[head.logits(X).argmax(axis=1)]
    assert np.mean(predicted == labels) > 0.5  # on its own training clips


def test_refusals_before_any_embedding(corpus, config, tmp_path):
    one = tmp_path / "one"
    (one / "whisper").mkdir(parents=True)
    for clip in sorted((corpus / "whisper" / "v0").iterdir()):
        (one / "whisper" / clip.name).symlink_to(clip)
    code, _, err = heads("train", str(one), "--name", "x", "--config", str(config))
    assert code == 2 and "at least 2 labels" in err, err
    (one / "low-slow").mkdir()
    (one / "low-slow" / "a.wav").symlink_to(corpus / "low-slow" / "v0" / "t0-0.wav")
    code, _, err = heads("train", str(one), "--name", "x", "--folds", "3", "--config",
                         str(config))
    assert code == 2 and "fewer clips than --folds 3: {'low-slow': 1}" in err, err


def test_unreadable_clips_are_counted_and_skipped_on_request(trained, corpus, config, cache,
                                                            tmp_path):
    data = tmp_path / "data"
    for label in CLASSES:
        (data / label).mkdir(parents=True)
        for clip in sorted((corpus / label).rglob("*.wav"))[:4]:
            (data / label / f"{clip.parent.name}-{clip.name}").symlink_to(clip)
    (data / "whisper" / "corrupt.wav").write_bytes(b"RIFF" + bytes(range(256)) * 8)
    args = ("train", str(data), "--name", "partial", "--folds", "3", "--config", str(config),
            "--model-version", "base", "--cache-dir", str(cache), *SMALL)
    code, _, err = heads(*args, "--out", str(tmp_path / "refused.safetensors"))
    assert code == 2, err
    assert "1 of 13 clips could not be used (1 unsupported_audio)" in err, err
    assert "corrupt.wav" in err and "--skip-bad" in err
    assert not (tmp_path / "refused.safetensors").exists()
    code, _, err = heads(*args, "--skip-bad", "--out", str(tmp_path / "rest.safetensors"))
    assert code == 0, err
    meta = decode((tmp_path / "rest.safetensors").read_bytes(), 2**24).metadata
    assert meta["training"]["clips_per_label"] == {"high-fast": 4, "low-slow": 4, "whisper": 4}
    (skipped,) = meta["training"]["skipped"]
    assert skipped["path"].endswith("corrupt.wav") and "unsupported_audio" in skipped["error"]


def test_segments_of_a_recording_embed_as_their_clips(trained, corpus, config, cache,
                                                     tmp_path):
    """start_s/end_s rows go through the job's --by-segment path: each segment's embedding
    is its own clip's (the recording is the clips end to end, sample for sample)."""
    chosen = [sorted((corpus / label).rglob("*.wav"))[i] for label in CLASSES for i in (0, 5)]
    pieces = [soundfile.read(path, dtype="float32")[0] for path in chosen]
    recording = tmp_path / "call.wav"
    soundfile.write(recording, np.concatenate(pieces), 16_000, subtype="FLOAT")
    edges = np.cumsum([0] + [len(piece) for piece in pieces]) / 16_000
    manifest = tmp_path / "segments.jsonl"
    manifest.write_text("".join(json.dumps({"path": "call.wav", "label": path.parent.parent.name,
                                            "start_s": float(a), "end_s": float(b)}) + "\n"
                                for path, a, b in zip(chosen, edges[:-1], edges[1:])))
    clips = datasets.read(manifest).clips
    plan = plan_job(config, "base")
    found = embeddings.extract(clips, plan, cache, None, 0.25)
    assert found.errors == [None] * 6 and found.extracted == 6
    whole = embeddings.extract(datasets.read(corpus).clips, plan, cache, None, 0.25)
    assert whole.extracted == 0  # all cached by the first run
    by_path = {clip.path: e for clip, e in zip(datasets.read(corpus).clips, whole.embeddings)}
    for path, embedding in zip(chosen, found.embeddings):
        assert np.abs(embedding - by_path[str(path)]).max() <= 1e-4


def test_evaluate_local_a_head_and_the_builtin_with_a_label_map(trained, corpus, config,
                                                                tmp_path):
    _, heads_dir = trained
    report, plot = tmp_path / "head.json", tmp_path / "head.png"
    code, out, err = heads("evaluate", "voices@1", str(corpus), "--local", "--heads-dir",
                           str(heads_dir), "--config", str(config), "--model-version", "base",
                           "--report", str(report), "--plot", str(plot))
    assert code == 0, err
    assert "voices@1 on 72 clips (0 failed): UA" in out and "true \\ predicted" in out
    found = json.loads(report.read_text())
    assert found["metrics"]["ua"] >= 0.8  # its own training clips
    assert found["labels"] == ["high-fast", "low-slow", "whisper"]
    assert 0 <= found["metrics"]["ece"] <= 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report, plot = tmp_path / "builtin.json", tmp_path / "builtin.png"
    code, out, err = heads("evaluate", "builtin", str(corpus), "--local", "--label-map",
                           "high-fast=happy,low-slow=sad,whisper=fearful", "--config",
                           str(config), "--model-version", "base", "--report", str(report),
                           "--plot", str(plot))
    assert code == 0, err
    found = json.loads(report.read_text())
    assert found["labels"] == ["fearful", "happy", "sad"]  # the checkpoint's order
    assert found["label_map"] == {"high-fast": "happy", "low-slow": "sad",
                                  "whisper": "fearful"}
    assert sum(map(sum, found["metrics"]["confusion"]["matrix"])) == 72
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = heads("evaluate", "builtin", str(corpus), "--local", "--config",
                         str(config), "--model-version", "base")
    assert code == 2 and "give --label-map" in err, err
