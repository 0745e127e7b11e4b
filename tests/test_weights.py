"""The checkpoint format, without Ray: key mapping equal to FunASR's own loader, the strict
check, and the generator writing the published files."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import shutil

import pytest
import torch
import yaml

from serve_app.checkpoints import generate, weights
from serve_app.config import ModelSettings
from serve_app.inference.engine import EmotionEngine, ModelLoadError
from tests.conftest import PUBLISHED

# sha256 of the published files (Hugging Face revision 6c303ba, ModelScope v2.0.5)
PUBLISHED_SHA256 = {
    "config.yaml": "f4fa0eb82cc78bfebb43c56d68791afb01788085a18897d20999af7bc45d51d3",
    "tokens.txt": "866121e470057b847d7a50e9923509141fb2924392f53385a186482a1ec0fb7f",
    "configuration.json": "8b6a745213025c7d4565f9f074cfef1b5cd5ef76e38e2a8f7f8a3db271e735b2",
}

TOY_KEYS = ["blocks.0.weight", "blocks.0.bias", "proj.weight", "proj.bias"]


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(3, 2)])
        self.proj = torch.nn.Linear(2, 1)


def numbered(keys: list[str]) -> dict[str, torch.Tensor]:
    """Each key's tensor holds its own number: where a value lands tells which key it was."""
    shapes = Toy().state_dict()
    return {key: torch.full(shapes[key.removeprefix("d2v_model.").removeprefix("module.")
                                   .replace("layers.", "blocks.")].shape, float(number))
            for number, key in enumerate(keys, start=1)}


def _prefixed(prefix: str, keep: tuple[str, ...] = ()) -> list[str]:
    return [k if k.startswith(keep) and keep else prefix + k for k in TOY_KEYS]


LAYOUTS = {
    # name: (checkpoint wrapper, file keys, scope_map)
    "published": ("model", _prefixed("d2v_model.", keep=("proj.",)), ["d2v_model.", "none"]),
    "plain": (None, TOY_KEYS, []),
    "module": (None, _prefixed("module."), []),
    "state_dict": ("state_dict", TOY_KEYS, None),
    "scope as a string": ("model", _prefixed("d2v_model.", keep=("proj.",)), "d2v_model.,none"),
    "both prefixes: the last pair wins": (
        "model", [*_prefixed("d2v_model."), *_prefixed("module.")], ["d2v_model.", "None"]),
    "plain and prefixed: the prefix wins": (
        "model", [*TOY_KEYS, *_prefixed("d2v_model.")], ["d2v_model.", "none"]),
    "renamed prefix": ("model", [k.replace("blocks.", "layers.") for k in TOY_KEYS],
                       ["layers.", "blocks."]),
    "partly missing": ("model", TOY_KEYS[:2], ["d2v_model.", "none"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_key_mapping_is_funasrs(layout, tmp_path):
    """Whatever FunASR's load_pretrained_model puts in each parameter, the mapping finds."""
    from funasr.train_utils.load_pretrained_model import load_pretrained_model

    wrapper, keys, scope_map = LAYOUTS[layout]
    state = numbered(keys)
    checkpoint = {wrapper: state, "last_optimizer_state": {"state": {}}} if wrapper else state
    path = tmp_path / "model.pt"
    torch.save(checkpoint, path)

    toy = Toy()
    for parameter in toy.parameters():
        torch.nn.init.constant_(parameter, -1.0)  # "not loaded"
    # (a copy: FunASR appends to the list it is given)
    load_pretrained_model(str(path), toy, scope_map=copy.copy(scope_map) or [])
    by_funasr = {k: (keys[int(v.flatten()[0]) - 1] if v.flatten()[0] > 0 else None)
                 for k, v in toy.state_dict().items()}

    read = weights.read_weights(path)
    pairs = weights.scope_pairs(scope_map)
    assert {k: weights.source_key(k, read, pairs) for k in TOY_KEYS} == by_funasr
    if None in by_funasr.values():
        with pytest.raises(ModelLoadError, match=r"2 missing .*proj\.weight"):
            weights.select(Toy().state_dict(), read, pairs, path)
    else:
        chosen = weights.select(Toy().state_dict(), read, pairs, path)
        assert all(torch.equal(chosen[k], toy.state_dict()[k]) for k in TOY_KEYS)


def test_select_names_the_file_and_the_first_offending_keys(tmp_path):
    path = tmp_path / "model.pt"
    good = {f"d2v_model.{k}": v for k, v in Toy().state_dict().items()}
    pairs = weights.scope_pairs(["d2v_model.", "none"])
    expected = Toy().state_dict()
    wrong = dict(good, **{"d2v_model.proj.weight": torch.zeros(4, 2)})
    with pytest.raises(ModelLoadError, match=re.escape(str(path)) + r".*0 missing and 1 "
                       r"mis-shaped.*d2v_model\.proj\.weight: \[4, 2\] in the file, "
                       r"\[1, 2\] in the model"):
        weights.select(expected, wrong, pairs, path)
    not_tensor = dict(good, **{"d2v_model.proj.bias": [0.0]})
    with pytest.raises(ModelLoadError, match=r"1 missing .*missing proj\.bias"):
        weights.select(expected, not_tensor, pairs, path)
    # A prefix the config does not map: the error shows the file's keys it could not use.
    with pytest.raises(ModelLoadError, match=r"4 missing .*unused keys in the file: "
                                             r"d2v_model\.blocks\.0\.weight"):
        weights.select(expected, good, weights.scope_pairs([]), path)
    for bad in (["d2v_model."], [None, "none"], 3):
        with pytest.raises(ModelLoadError, match="scope_map must list prefixes in pairs"):
            weights.scope_pairs(bad)
    half = tmp_path / "half.pt"
    torch.save({"model": good}, half)
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=rf"cannot read {re.escape(str(half))}"):
        weights.read_weights(half)


def _differences(ours, theirs, path="") -> list[str]:
    """Every key path where two parsed YAML documents differ (keys, values or types)."""
    if not (isinstance(ours, dict) and isinstance(theirs, dict)):
        same = type(ours) is type(theirs) and ours == theirs
        return [] if same else [f"{path}: {ours!r} != {theirs!r}"]
    found = []
    for key in sorted(ours.keys() | theirs.keys(), key=str):
        if key in ours and key in theirs:
            found += _differences(ours[key], theirs[key], f"{path}.{key}")
        else:
            found.append(f"{path}.{key}: only in {'ours' if key in ours else 'the published'}")
    return found


def test_generated_large_is_the_published_directory(tmp_path):
    """config.yaml key by key (and byte for byte), tokens.txt and configuration.json byte for
    byte; model.pt laid out as published."""
    for name, digest in PUBLISHED_SHA256.items():  # the reference copies are the published
        assert hashlib.sha256((PUBLISHED / name).read_bytes()).hexdigest() == digest
    directory = generate.write_checkpoint(tmp_path / "large", "large", 0)
    try:
        _check_published_large(directory)
    finally:
        shutil.rmtree(directory)  # 650 MB


def _check_published_large(directory):
    ours = yaml.safe_load((directory / "config.yaml").read_text(encoding="utf-8"))
    theirs = yaml.safe_load((PUBLISHED / "config.yaml").read_text(encoding="utf-8"))
    assert not _differences(ours, theirs)
    assert ours["scope_map"] == ["d2v_model.", "none"]
    for name in ("config.yaml", "tokens.txt", "configuration.json"):
        assert (directory / name).read_bytes() == (PUBLISHED / name).read_bytes(), name

    checkpoint = torch.load(directory / "model.pt", mmap=True, weights_only=True)
    assert list(checkpoint) == ["model"]
    state = checkpoint["model"]
    assert len(state) == 185  # the published large's tensor count
    assert sum(t.numel() for t in state.values()) == pytest.approx(162.1e6, abs=0.05e6)
    assert sorted(k for k in state if not k.startswith("d2v_model.")) == [
        "proj.bias", "proj.weight"]
    assert list(state["proj.weight"].shape) == [9, 1024]
    assert not [k for k in state if ".decoder." in k]
    assert all(t.dtype == torch.float32 for t in state.values())


@pytest.mark.parametrize("arch,params", [("tiny", 194_765), ("base", 93_178_133)])
def test_other_sizes_differ_only_in_size_numbers(arch, params):
    from funasr.models.emotion2vec.model import Emotion2vec

    differences = _differences(generate.model_config(arch), generate.model_config("large"))
    sized = {".model_conf.depth", ".model_conf.embed_dim", ".model_conf.num_heads",
             ".model_conf.modalities.audio.decoder.decoder_dim",
             ".model_conf.modalities.audio.feature_encoder_spec",
             ".model_conf.modalities.audio.model_depth",
             ".model_conf.modalities.audio.num_alibi_heads",
             ".model_conf.modalities.audio.num_extra_tokens",
             ".model_conf.modalities.audio.prenet_depth"}
    assert {d.split(":")[0] for d in differences} <= sized
    with torch.device("meta"):  # shapes only
        model = Emotion2vec(**generate.model_config(arch), vocab_size=len(generate.TOKENS))
    weights.drop_pretraining_decoder(model)
    assert sum(p.numel() for p in model.parameters()) == params  # base: 93.2 M, published


def test_checkpoints_are_deterministic_marked_and_optimizer_sized(tmp_path):
    first = generate.write_checkpoint(tmp_path / "a", "tiny", seed=3)
    second = generate.write_checkpoint(tmp_path / "b", "tiny", seed=3)
    other = generate.write_checkpoint(tmp_path / "c", "tiny", seed=4)
    a, b, c = (torch.load(d / "model.pt")["model"] for d in (first, second, other))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Byte for byte: nodes that each generate their own copy serve the same identity (sha256).
    assert (first / "model.pt").read_bytes() == (second / "model.pt").read_bytes()
    assert not all(torch.equal(a[k], c[k]) for k in a)
    marker = generate.random_weights_info(first)
    assert (marker["weights"], marker["arch"], marker["seed"], marker["format"]) == (
        "random", "tiny", 3, generate.FORMAT)
    assert generate.write_checkpoint(first, "tiny", seed=3) == first  # a no-op
    with pytest.raises(ValueError, match="seed 3"):
        generate.write_checkpoint(first, "tiny", seed=5)

    # The same weights, with Adam's two moments per tensor: the file is ~3x.
    full = generate.write_checkpoint(tmp_path / "d", "tiny", seed=3, optimizer_state=True)
    checkpoint = torch.load(full / "model.pt")
    assert all(torch.equal(checkpoint["model"][k], a[k]) for k in a)
    assert len(checkpoint["last_optimizer_state"]["state"]) == len(a)
    ratio = (full / "model.pt").stat().st_size / (first / "model.pt").stat().st_size
    assert 2.7 < ratio < 3.3, ratio
    assert generate.random_weights_info(full)["optimizer_state"] is True
    # Both loaders take it, with the same result as without.
    clip = torch.randn(16_000, generator=torch.Generator().manual_seed(0)).numpy() * 0.1
    scores = []
    for directory, loader in ((first, "mmap"), (full, "mmap"), (full, "funasr")):
        engine = EmotionEngine(ModelSettings(source=str(directory), loader=loader), "cpu", 1)
        engine.load()
        assert engine.model.modality_encoders["AUDIO"].decoder is None
        scores.append(engine.predict(clip, "utterance", False).scores)
    assert scores[1] == pytest.approx(scores[0], abs=1e-7)
    assert scores[2] == pytest.approx(scores[0], abs=1e-7)


@pytest.mark.parametrize("other_seed", [3, 4])
def test_checkpoint_writers_on_a_shared_filesystem_without_locks(tmp_path, monkeypatch,
                                                                 other_seed):
    """Two nodes write the same checkpoint on shared storage whose flock fails: the one that
    renames second keeps the first one's copy (or refuses it if it holds another seed) and
    leaves no staging folder behind."""
    import errno
    import fcntl
    import shutil

    other_node = generate.write_checkpoint(tmp_path / "elsewhere", "tiny", seed=other_seed)
    shared = tmp_path / "shared"
    real_config = generate.model_config

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "no locks available")

    def other_node_finishes_meanwhile(arch):
        # Called once this writer has found no checkpoint and starts building its own.
        shutil.copytree(other_node, shared)
        return real_config(arch)

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(generate, "model_config", other_node_finishes_meanwhile)
    if other_seed == 3:
        assert generate.write_checkpoint(shared, "tiny", seed=3) == shared
    else:
        with pytest.raises(ValueError, match="seed 4 .*not tiny seed 3"):
            generate.write_checkpoint(shared, "tiny", seed=3)
    assert (shared / "model.pt").read_bytes() == (other_node / "model.pt").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shared")] == [".shared.lock"]


def test_an_older_generated_checkpoint_is_regenerated(tmp_path, caplog):
    """A directory of the earlier generator (a plain state_dict of another depth, a marker
    without `format`) is ours: asked for again, it is replaced, with a log line."""
    from funasr.models.emotion2vec.model import Emotion2vec

    old = tmp_path / "large-seed0"
    old.mkdir()
    config = generate.model_config("tiny")
    config["model_conf"]["depth"] = 3
    del config["scope_map"]
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save(Emotion2vec(**config, vocab_size=9).state_dict(), old / "model.pt")
    (old / "tokens.txt").write_text("\n".join(generate.TOKENS) + "\n")
    (old / generate.RANDOM_MARKER).write_text(json.dumps(
        {"weights": "random", "arch": "tiny", "seed": 0}))

    settings = ModelSettings(source=str(old), generate={"arch": "tiny", "seed": 0})
    with caplog.at_level(logging.WARNING):
        EmotionEngine(settings, "cpu", 1).load()
    assert "older generator" in caplog.text and str(old) in caplog.text
    assert generate.random_weights_info(old)["format"] == generate.FORMAT
    assert yaml.safe_load((old / "config.yaml").read_text())["model_conf"]["depth"] == 2
    assert list(torch.load(old / "model.pt")) == ["model"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".large-seed0.")
                and p.is_dir()]  # no staging or old copy left behind

