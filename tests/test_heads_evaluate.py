"""`emotion2vec-serve heads evaluate ... --url`: a head trained by `heads train` into the
running service's heads_dir (conftest's `service`: tiny checkpoints) and measured through
POST /v1/predict gives the report `--local` gives (the same engine, so the same predictions);
`builtin` through the service takes the variant's labels from GET /v1/models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.clips import espeak_available
from tests.heads_corpus import make_corpus
from tests.test_heads_train import heads
from tests.waiting import eventually

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

NAME = "evaluated"
CLIPS = 18  # 3 labels x 3 voices x 2 texts, one take each
LABEL_MAP = "high-fast=happy,low-slow=sad,whisper=fearful"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("evaluate-corpus"), voices=3, jitters=(0,))


@pytest.fixture(scope="module")
def trained(service, client, corpus, service_config, tmp_path_factory) -> str:
    """The head, trained on the corpus into the service's heads_dir (no --heads-dir: the
    config's), once the service's registry shows it."""
    code, out, err = heads("train", str(corpus), "--name", NAME, "--group-by", "folder",
                           "--folds", "3", "--config", str(service_config),
                           "--model-version", "base",
                           "--cache-dir", str(tmp_path_factory.mktemp("evaluate-cache")),
                           "--num-cpus", "0.25")
    assert code == 0, err
    assert f"stored as {NAME}@1 in {service.heads_dir}" in out, out
    eventually(lambda: client.get(f"/v1/heads/{NAME}@1").status_code == 200,
               "the trained head in the service's registry", timeout_s=10, interval_s=0.2)
    return f"{NAME}@1"


def evaluate(*args: str, report: Path) -> dict:
    code, out, err = heads("evaluate", *args, "--report", str(report))
    assert code == 0, err + out
    assert f"on {CLIPS} clips (0 failed)" in out, out
    return json.loads(report.read_text())


def assert_same_measure(remote: dict, local: dict) -> None:
    assert remote["failed"] == local["failed"] == []
    assert remote["labels"] == local["labels"] and remote["label_map"] == local["label_map"]
    ours, theirs = remote["metrics"], local["metrics"]
    assert ours["confusion"] == theirs["confusion"]
    assert sum(map(sum, ours["confusion"]["matrix"])) == CLIPS
    for key in ("ua", "wa", "macro_f1"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key
    assert ours["ece"] == pytest.approx(theirs["ece"], abs=1e-4)  # from the scores


def test_a_head_through_the_service_measures_as_in_process(service, corpus, service_config, trained,
                                                           tmp_path):
    remote = evaluate(trained, str(corpus), "--url", service.url, "--model-version", "base",
                      report=tmp_path / "remote.json")
    local = evaluate(trained, str(corpus), "--local", "--config", str(service_config),
                     "--model-version", "base", report=tmp_path / "local.json")
    assert remote["scored_by"] == f"{trained} at {service.url}"
    assert local["scored_by"] == trained
    assert remote["labels"] == ["high-fast", "low-slow", "whisper"]
    assert_same_measure(remote, local)
    # Trained on these very clips: well above chance (1/3), or the comparison shows nothing.
    assert remote["metrics"]["ua"] >= 0.6, remote["metrics"]


def test_builtin_through_the_service_takes_the_variants_labels(service, corpus, service_config,
                                                               tmp_path):
    remote = evaluate("builtin", str(corpus), "--url", service.url, "--model-version", "base",
                      "--label-map", LABEL_MAP, report=tmp_path / "remote.json")
    local = evaluate("builtin", str(corpus), "--local", "--config", str(service_config),
                     "--model-version", "base", "--label-map", LABEL_MAP,
                     report=tmp_path / "local.json")
    assert remote["labels"] == ["fearful", "happy", "sad"]  # the checkpoint's order
    assert_same_measure(remote, local)
    # An alias is resolved through GET /v1/models (fast: turbo, large's checkpoint).
    code, out, err = heads("evaluate", "builtin", str(corpus), "--url", service.url,
                           "--model-version", "fast", "--label-map", LABEL_MAP)
    assert code == 0 and f"builtin at {service.url} on {CLIPS} clips" in out, err
    # Labels the service's variant lacks, and a variant it lacks: refused before scoring.
    code, _, err = heads("evaluate", "builtin", str(corpus), "--url", service.url,
                         "--model-version", "base")
    assert code == 2 and "give --label-map" in err and "'surprised'" in err, err
    code, _, err = heads("evaluate", "builtin", str(corpus), "--url", service.url,
                         "--model-version", "nope", "--label-map", LABEL_MAP)
    assert code == 2 and "no variant 'nope'" in err, err
