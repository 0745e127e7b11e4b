"""Checkpoint layouts through the service, with both loaders side by side (base: mmap, large:
funasr): the published layout, a plain state_dict and a `module.`-prefixed one all answer what
FunASR's AutoModel.generate answers on the same directory; broken files fail the swap clearly
and the old model keeps serving."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from serve_app.audio import sndfile
from serve_app.checkpoints import generate
from tests.test_lifecycle import Client, make_app

APP, PREFIX = "formats", "/formats"
LOADERS = {"base": "mmap", "large": "funasr"}


def _variant_configs(directory: Path) -> dict:
    return {name: {"source": str(directory), "generate": None, "loader": loader}
            for name, loader in LOADERS.items()}


def _relayout(published: Path, folder: Path, rewrite, scope_map: bool = True) -> Path:
    """A copy of `published` whose model.pt is rewrite(published weights)."""
    shutil.copytree(published, folder)
    state = torch.load(published / "model.pt")["model"]
    torch.save(rewrite({k.removeprefix("d2v_model."): v for k, v in state.items()}),
               folder / "model.pt")
    if not scope_map:  # older and fine-tuned checkpoints' configs do not have one
        config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        del config["scope_map"]
        (folder / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    published = generate.write_checkpoint(root / "published", "tiny", 51)
    return {
        "published": published,
        "plain": _relayout(published, root / "plain", lambda s: s, scope_map=False),
        "module": _relayout(published, root / "module", lambda s: {
            "state_dict": {f"module.{k}": v for k, v in s.items()}}, scope_map=False),
    }


@pytest.fixture(scope="module")
def formats(cluster, layouts):
    cluster.put(make_app(layouts["published"], name=APP, prefix=PREFIX,
                         variants=tuple(LOADERS), **_variant_configs(layouts["published"])))
    assert cluster.wait_for(APP, ("RUNNING", "DEPLOY_FAILED")).status == "RUNNING"
    yield Client(cluster.url, PREFIX)
    cluster.remove(APP)


def _serving(client: Client, directory: Path) -> None:
    for name in LOADERS:
        client.wait(name, lambda i: i["state"] == "ready" and (i["identity"] or {}).get(
            "source") == directory.name, timeout_s=120)  # clients see no server paths


@pytest.mark.parametrize("layout", ["published", "plain", "module"])
def test_layouts_answer_as_funasr_does_with_both_loaders(cluster, formats, layouts, layout,
                                                         clips, funasr_models):
    directory = layouts[layout]
    cluster.put(make_app(directory, name=APP, prefix=PREFIX, variants=tuple(LOADERS),
                         **_variant_configs(directory)))
    _serving(formats, directory)
    clip = clips["tone_5s_16k_wav"]
    decoded = sndfile.decode(clip.read_bytes(), max_duration_s=60, min_duration_s=0.1)
    expected = funasr_models(directory).generate(decoded.waveform, extract_embedding=True)[0]
    for name in LOADERS:
        response = formats.predict(clip, model_version=name, extract_embedding="true")
        assert response.status_code == 200, response.text
        body = response.json()
        np.testing.assert_allclose(list(body["scores"].values()), expected["scores"],
                                   atol=1e-5, rtol=0, err_msg=f"{layout}, {name}")
        np.testing.assert_allclose(body["embedding"], expected["feats"], atol=1e-5, rtol=0,
                                   err_msg=f"{layout}, {name}")


def _broken(published: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """kind -> (directory, what the error must say)."""
    state = torch.load(published / "model.pt")
    weights = state["model"]
    broken = {}

    def variant(kind: str, model: dict, expected: str) -> None:
        folder = root / f"broken-{kind}"
        shutil.copytree(published, folder)
        torch.save({**state, "model": model}, folder / "model.pt")
        broken[kind] = (folder, expected)

    qkv = "d2v_model.blocks.0.attn.qkv.weight"
    variant("missing_tensor", {k: v for k, v in weights.items() if k != qkv},
            r"1 missing and 0 mis-shaped tensors \(missing blocks\.0\.attn\.qkv\.weight")
    fc1 = "d2v_model.blocks.1.mlp.fc1.weight"
    variant("wrong_shape", {**weights, fc1: weights[fc1].t().contiguous()},
            rf"mis-shaped {fc1}: \[64, 256\] in the file, \[256, 64\] in the model")
    folder = root / "broken-truncated"
    shutil.copytree(published, folder)
    data = (published / "model.pt").read_bytes()
    (folder / "model.pt").write_bytes(data[: len(data) // 2])
    broken["truncated"] = (folder, "cannot read|could not load")
    broken["missing"] = (root / "does-not-exist", "does not exist")
    return broken


def test_broken_files_fail_the_swap_clearly_and_the_old_model_keeps_serving(
        cluster, formats, layouts, clips, tmp_path):

    published = layouts["published"]
    cluster.put(make_app(published, name=APP, prefix=PREFIX, variants=tuple(LOADERS),
                         **_variant_configs(published)))
    _serving(formats, published)
    clip = clips["tone_16k_mono_wav"]
    before = {name: (formats.variant(name), formats.predict(clip, model_version=name).json())
              for name in LOADERS}
    for kind, (folder, expected) in _broken(published, tmp_path).items():
        cluster.put(make_app(published, name=APP, prefix=PREFIX, variants=tuple(LOADERS),
                             **_variant_configs(folder)))
        for name, loader in LOADERS.items():
            info = formats.wait(name, lambda i, f=folder.name: (i["last_swap"] or {}).get(
                "requested", {}).get("source") == f, timeout_s=120)
            swap, where = info["last_swap"], f"{kind}, {loader}"
            assert swap["result"] == "failed", where
            assert re.search(expected, swap["error"]), (where, swap["error"])
            assert folder.name in swap["error"], (where, swap["error"])
            assert str(folder.parent) not in json.dumps(info), where  # names, never paths
            served, answer = before[name]
            assert info["state"] == "ready" and info["identity"] == served["identity"], where
            assert info["load_count"] == served["load_count"], where
            response = formats.predict(clip, model_version=name)
            assert response.status_code == 200, where
            assert response.json()["scores"] == answer["scores"], where
