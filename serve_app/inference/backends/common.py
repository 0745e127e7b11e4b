"""What every backend shares: the interface, the registry, the artefact disk cache, the check
against eager, and the fall-back to eager PyTorch with the reason why.

A backend is one module of this package, named in REGISTRY, with `COMPILED`:
- False (eager): `build(model, spec: BuildSpec) -> (backend, BackendInfo)`;
- True: it holds its own copy of the weights, built from serve_app.inference.graph.PaddedEncoder
  and run on the CPU only, in two steps: `convert(model, spec) -> Artefact` (the artefact in
  the disk cache, converted from the torch encoder on a miss) and
  `load(artefact, model, spec) -> (backend, BackendInfo)` (which needs no torch weights).
A backend has `single(source) -> 1 x T x D float32 frames` and
`batch(sources) -> (B x T_max x D float32 frames, each clip's T_i)`, on waveforms already
normalised per clip (the engine does that, and the head, pooling, windows and timeline).

One copy of the weights (`select`): eager's answer on a check clip is taken first, then the
artefact converted, then the torch encoder freed (`release_encoder`), and only then the artefact
compiled, checked against eager's answer and its mapped pages handed back to the kernel once the
compiled copy has read them (serve_app/inference/memory.py). A precision the backend refuses
there (int8 beyond its bound) is replaced by its `FALLBACK` (reduced), with the reason; a
backend that fails after the encoder was freed gets the model read again (`reload`) for eager.

Artefacts are cached on disk under `compiled_cache_dir/<key>/`, the key a sha256 of everything
that changes them (`cache_key`): the checkpoint's sha256, the backend and its library versions,
torch's, and the source of the modules that build them (this one, the graph's, the backend's
own). Not the CPU: a converted model runs on any (what is compiled for one CPU kind is kept
apart by `cpu_tag`), so a fleet converts once, or ships the artefact made by
`emotion2vec-serve export --format openvino`. An artefact is written once per key (atomic
rename: replicas that build it at once do not clash; a file lock makes the others wait).

A backend that cannot run here (not installed, a conversion or compile that fails, a CPU
without what it needs, results that differ from eager on a check clip) leaves the engine on
eager PyTorch, with the reason in `note`: a replica never fails for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from serve_app.config import BackendName
from serve_app.inference import graph, memory, padded

logger = logging.getLogger(__name__)

# backend name (the `backend` setting) -> its module in this package
REGISTRY = {"torch": "eager", "openvino": "openvino", "onnxruntime": "onnxruntime"}
# The setting's allowed values are the registry's names, and the other way round.
assert set(REGISTRY) == set(typing.get_args(BackendName)), "config.BackendName != REGISTRY"
CHECK_SAMPLES = 24_000  # 1.5 s: the check clip run on both backends at load
# Largest difference from eager fp32 allowed on the check clip's scores: float rounding in f32,
# a sanity bound in bf16 (the fidelity benchmark holds turbo to far tighter bounds); int8 (NNCF
# on openvino: int8.py) 2e-2, about 20x what large and tiny measure (1.1e-3, 1.2e-3): beyond it
# openvino runs reduced instead.
CHECK_TOLERANCE = {"fp32": 1e-4, "reduced": 5e-2, "int8": 2e-2}
UNHASHED = "unhashed"


class BackendUnavailable(RuntimeError):
    """The backend cannot run here; the engine stays on eager PyTorch."""


@dataclass
class BackendInfo:
    requested: str
    backend: str               # what runs
    precision: str             # f32 / bf16 / f16 / int8: what the encoder computes in
    note: str | None = None    # why the requested backend does not run, or what it fell back to
    build_s: float = 0.0       # conversion and compile time at load
    cache: str | None = None   # hit (artefacts reused) or miss (built now); None for torch
    cache_dir: str | None = None
    check_diff: float | None = None  # the check clip's largest score difference from eager


@dataclass(frozen=True)
class Artefact:
    """A compiled backend's converted model on disk, and whether the cache had it."""

    folder: Path
    hit: bool
    started: float  # perf_counter at the start of the build: build_s counts from it


@dataclass(frozen=True)
class BuildSpec:
    """What a backend's `build` gets besides the model."""

    precision: str                   # the setting: fp32 / reduced / int8
    device: str
    threads: int
    checkpoint_sha256: str | None    # None: no file to key a cache on
    cache_root: Path
    autocast: Callable               # the engine's reduced-precision context (eager)


class Backend(Protocol):
    name: str

    def single(self, source: torch.Tensor) -> torch.Tensor: ...

    def batch(self, sources: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]: ...


def backend_module(name: str) -> ModuleType:
    """The module of a registered backend; ValueError naming the valid ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; valid: {sorted(REGISTRY)}")
    return importlib.import_module(f"{__package__}.{REGISTRY[name]}")


def padded_batch(sources: list[torch.Tensor], min_width: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Zero-padded B x S float32 waveform (S at least min_width) and each clip's samples."""
    lengths = np.array([len(s) for s in sources], dtype=np.int64)
    waveform = np.zeros((len(sources), max(min_width, int(lengths.max()))), dtype=np.float32)
    for i, source in enumerate(sources):
        waveform[i, :len(source)] = source.cpu().numpy()
    return waveform, lengths


class PaddedGraphBackend:
    """A compiled backend's calls over PaddedEncoder's graph (waveform B x S, lengths B ->
    frames B x T_max x D): a subclass gives `_run`; clips are padded to at least MIN_WIDTH
    samples (the mask keeps padding out) and each clip's frame count is the model's own."""

    MIN_WIDTH = 0

    def __init__(self, model: torch.nn.Module):
        self._lengths = lambda samples: padded.frame_lengths(model, samples)

    def _run(self, waveform: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def single(self, source: torch.Tensor) -> torch.Tensor:
        frames, lengths = self.batch([source])
        return frames[:, :int(lengths[0])]

    def batch(self, sources: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        waveform, lengths = padded_batch(sources, self.MIN_WIDTH)
        return self._run(waveform, lengths), self._lengths(torch.from_numpy(lengths))


def compiled_info(name: str, precision: str, note: str | None, artefact: Artefact
                  ) -> BackendInfo:
    """A compiled backend's BackendInfo: its build time so far and its cache use."""
    return BackendInfo(name, name, precision, note,
                       round(time.perf_counter() - artefact.started, 3),
                       "hit" if artefact.hit else "miss", str(artefact.folder))


# -- the artefact cache ---------------------------------------------------------------------
def cpu_identity() -> dict:
    """The CPU model and feature flags."""
    identity = {"machine": platform.machine(), "model": "", "flags": ""}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not identity["model"]:
                identity["model"] = value.strip()
            elif key == "flags" and not identity["flags"]:
                identity["flags"] = " ".join(sorted(value.split()))
    return identity


def cpu_tag() -> str:
    """A short name for this CPU kind: what is compiled for it is only valid on the same."""
    return hashlib.sha256(json.dumps(cpu_identity(), sort_keys=True).encode()).hexdigest()[:12]


def code_digest(modules: Iterable[ModuleType]) -> str:
    """sha256 of the source of `modules`, this one and the graph's always included."""
    digest = hashlib.sha256()
    for path in sorted({Path(m.__file__) for m in (*modules, graph, padded)}
                       | {Path(__file__)}):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(checkpoint_sha256: str | None, backend: str, versions: dict,
              code: Iterable[ModuleType]) -> dict:
    """Everything that changes a backend's artefacts (its sha256 names their folder):
    `versions` are the backend's libraries (name -> version), `code` the modules that build
    the artefacts."""
    return {"checkpoint_sha256": checkpoint_sha256 or UNHASHED, "backend": backend,
            **versions, "torch": torch.__version__, "code": code_digest(code)}


def key_dir(root: Path, key: dict) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return root / name


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """One builder per key at a time on this node (large and turbo share a checkpoint): the
    others wait, then find the artefact written. Without file locks, the atomic rename holds."""
    with open(lock_path, "w") as handle:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _publish(target: Path, artefact: str, key: dict, write: Callable[[Path], None]) -> None:
    """`write(folder)` into a staging folder, then rename it to `target` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)
        (staging / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True))
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / artefact).is_file():  # not another writer's complete copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cached_artefact(cache_root: Path, key: dict, artefact: str,
                    write: Callable[[Path], None]) -> Artefact:
    """The folder holding `artefact` for `key`, and whether it was there already (a hit);
    on a miss `write(folder)` builds it. Without a checkpoint hash there is nothing to key
    on: it is built in a private temporary folder, never shared."""
    started = time.perf_counter()
    folder, hit = _cached(cache_root, key, artefact, write)
    return Artefact(folder, hit, started)


def _cached(cache_root: Path, key: dict, artefact: str,
            write: Callable[[Path], None]) -> tuple[Path, bool]:
    if key["checkpoint_sha256"] == UNHASHED:
        folder = Path(tempfile.mkdtemp(prefix=f"e2v-{key['backend']}-")) / "artefact"
        _publish(folder, artefact, key, write)
        return folder, False
    folder = key_dir(Path(cache_root).expanduser(), key)
    if (folder / artefact).is_file():
        return folder, True
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder.with_name(folder.name + ".lock")):
        if (folder / artefact).is_file():  # written by another replica meanwhile
            return folder, True
        logger.info("%s: building %s in %s", key["backend"], artefact, folder)
        _publish(folder, artefact, key, write)
    return folder, False


# -- after a compiled backend is built -------------------------------------------------------
def release_encoder(model: torch.nn.Module) -> None:
    """Free the torch encoder once a compiled backend's artefact is written: only the head
    (copied out of the checkpoint's mapping, so that the mapping can go) is used after that.
    The conversion's leftovers (a traced graph holds the weights in reference cycles) are
    collected and the freed heap returned."""
    for parameter in model.proj.parameters():
        parameter.data = parameter.data.clone()
    for name, child in model.named_children():
        if name != "proj":
            child.to("meta")
    getattr(model, "alibi_biases", {}).clear()  # FunASR's ALiBi cache (the check clip's)
    memory.release()


def check_scores(backend: Backend, head) -> torch.Tensor:
    """`backend`'s scores on a fixed noise clip (CHECK_SAMPLES long)."""
    noise = np.random.default_rng(7).standard_normal(CHECK_SAMPLES).astype(np.float32) * 0.1
    source = torch.from_numpy(noise)
    source = F.layer_norm(source, source.shape)
    with torch.inference_mode():
        return torch.softmax(head(backend.single(source).mean(dim=1)), dim=-1)


def check_against_eager(backend: Backend, eager_scores: torch.Tensor, head,
                        tolerance: float) -> float:
    """Largest score difference between `backend` and eager's `check_scores`; raises
    BackendUnavailable beyond `tolerance` (a compiler that changes the answers is not used)."""
    diff = float((check_scores(backend, head) - eager_scores).abs().max())
    if not diff <= tolerance:
        raise BackendUnavailable(f"scores differ from eager by {diff:.2e} on the check clip "
                                 f"(allowed {tolerance:g})")
    return diff


def select(settings, model: torch.nn.Module, device: str, threads: int,
           checkpoint_sha256: str | None, autocast, reload: Callable[[], torch.nn.Module]
           ) -> tuple[Backend, BackendInfo, torch.nn.Module]:
    """The backend `settings.backend` asks for, or eager PyTorch with the reason why not; and
    the model the engine keeps (its head; `reload()`'s where eager needs the encoder back)."""
    spec = BuildSpec(settings.precision, device, threads, checkpoint_sha256,
                     Path(settings.compiled_cache_dir), autocast)
    module = backend_module(settings.backend)  # an unknown name is an error, not a fallback
    eager_module = backend_module("torch")
    eager, eager_info = eager_module.build(model, spec)
    if not module.COMPILED:
        return eager, eager_info, model
    released = False
    try:
        if device != "cpu":
            raise BackendUnavailable(f"{settings.backend} runs on the CPU, not on {device}")
        padded.check_supported(model)  # every compiled backend runs the padded graph
        # FunASR's own fp32 answer on the check clip, before the encoder goes
        reference = check_scores(eager_module.EagerBackend(model, contextlib.nullcontext),
                                 model.proj)
        artefact = module.convert(model, spec)
        release_encoder(model)
        released = True
        backend, info = _load_checked(module, artefact, model, spec, reference)
        return backend, info, model
    except Exception as exc:  # any failure of an optional backend: serve on eager
        reason = f"{settings.backend} unavailable, running eager torch: {exc}"
        logger.warning("%s", reason)
        if released:
            model = reload()
            eager, eager_info = eager_module.build(model, spec)
        eager_info.requested, eager_info.note = settings.backend, reason
        return eager, eager_info, model


def _load_checked(module: ModuleType, artefact: Artefact, model: torch.nn.Module,
                  spec: BuildSpec, reference: torch.Tensor) -> tuple[Backend, BackendInfo]:
    """The compiled backend within its precision's bound of `reference`; a precision the module
    names a FALLBACK for is replaced by it, with the reason in the note, when it is refused."""
    try:
        backend, info = module.load(artefact, model, spec)
        # The compiled copy of the weights is made while compiling and on the first inference
        # (the check's): after each, the artefact's pages it read go back to the kernel.
        folders = {artefact.folder, Path(info.cache_dir or artefact.folder)}
        for folder in folders:
            memory.page_out(folder)
        info.check_diff = check_against_eager(backend, reference, model.proj,
                                              CHECK_TOLERANCE[spec.precision])
        for folder in folders:
            memory.page_out(folder)
        return backend, info
    except Exception as exc:
        fallback = getattr(module, "FALLBACK", {}).get(spec.precision)
        if fallback is None:
            raise
        reason = (f"{spec.precision} refused ({exc}): {module.__name__.rsplit('.', 1)[-1]} "
                  f"runs in {fallback} precision")
        logger.warning("%s", reason)
        backend, info = _load_checked(module, artefact, model,
                                      dataclasses.replace(spec, precision=fallback), reference)
        info.note = reason if info.note is None else f"{reason}; {info.note}"
        return backend, info
