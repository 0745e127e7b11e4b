"""One copy of the weights in a replica on a compiled backend (serve_app/inference/memory.py,
backends.common.select): the torch encoder is freed, the artefact's mapped pages are handed
back once compiled, and a backend that fails after the encoder was freed still leaves eager
torch serving the same scores (the model read again). On the tiny model; the published-format
large is measured by `python -m benchmarks.cpu --stages memory`."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from serve_app.checkpoints import generate
from serve_app.config import ModelSettings
from serve_app.inference import memory
from serve_app.inference.backends import common
from serve_app.inference.engine import EmotionEngine
from tests import clips as clip_maker

pytest.importorskip("openvino")


def _resident_kb(root: Path) -> int:
    """This process's resident kB in mappings of files under `root`."""
    resident, inside = 0, False
    root_name = str(root.resolve())
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            inside = len(head) == 6 and head[5].startswith(root_name)
        elif inside and line.startswith("Rss:"):
            resident += int(head[1])
    return resident


def test_page_out_hands_back_a_read_mapping_and_the_bytes_read_again_are_the_files(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 16 * 2**20, dtype=np.uint8).tobytes()
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert mapped[:] == data  # every page read: resident
        assert _resident_kb(tmp_path) >= 15 * 1024
        assert memory.page_out(tmp_path) >= len(data)
        assert _resident_kb(tmp_path) < 2 * 1024
        assert mapped[:] == data  # read again from the file


def test_page_out_leaves_writable_mappings_alone(tmp_path):
    path = tmp_path / "scratch.bin"
    path.write_bytes(bytes(4 * 2**20))
    with open(path, "r+b") as handle, mmap.mmap(handle.fileno(), 0) as mapped:
        mapped[:] = b"\x01" * len(mapped)
        assert memory.page_out(tmp_path) == 0
        assert mapped[:16] == b"\x01" * 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("memory-ckpt") / "tiny-seed5"
    generate.write_checkpoint(path, "tiny", 5)
    return path


def _engine(tiny: Path, cache: Path, backend: str = "openvino") -> EmotionEngine:
    engine = EmotionEngine(ModelSettings(source=str(tiny), backend=backend,
                                         compiled_cache_dir=str(cache)), "cpu", 1)
    engine.load()
    return engine


@pytest.mark.parametrize("cached", [False, True], ids=["miss", "hit"])
def test_a_compiled_replica_keeps_no_torch_encoder_and_no_resident_artefact(tiny, tmp_path,
                                                                              cached):
    if cached:
        _engine(tiny, tmp_path)  # fills the cache
    engine = _engine(tiny, tmp_path)
    assert engine.info.backend == "openvino"
    assert engine.info.backend_info["cache"] == ("hit" if cached else "miss")
    encoder = [p for name, p in engine.model.named_parameters() if not name.startswith("proj.")]
    assert encoder and all(p.is_meta for p in encoder)
    assert not any(p.is_meta for p in engine.model.proj.parameters())
    weights_kb = sum(f.stat().st_size for f in tmp_path.rglob("*.bin")) // 1024
    assert _resident_kb(tmp_path) < weights_kb * 0.1, (_resident_kb(tmp_path), weights_kb)
    eager = _engine(tiny, tmp_path, backend="torch")
    clip = clip_maker.tone(2.3, 16_000, 260.0, 2)
    np.testing.assert_allclose(engine.predict(clip, "utterance", False).scores,
                               eager.predict(clip, "utterance", False).scores, atol=1e-5, rtol=0)


def test_a_backend_refused_after_the_encoder_was_freed_serves_eager_on_the_model_read_again(
        tiny, tmp_path, monkeypatch):
    """The check against eager runs after the torch encoder is freed: a compiled backend
    refused there (any difference at all allowed: none) leaves a whole eager model."""
    monkeypatch.setitem(common.CHECK_TOLERANCE, "fp32", -1.0)
    engine = _engine(tiny, tmp_path)
    assert engine.info.backend == "torch"
    assert "scores differ from eager" in engine.info.backend_info["note"]
    assert not any(p.is_meta for p in engine.model.parameters())
    monkeypatch.undo()
    eager = _engine(tiny, tmp_path, backend="torch")
    clip = clip_maker.tone(1.0, 16_000, 180.0, 1)
    for granularity in ("utterance", "frame"):
        np.testing.assert_allclose(engine.predict(clip, granularity, True).scores,
                                   eager.predict(clip, granularity, True).scores,
                                   atol=1e-6, rtol=0)
