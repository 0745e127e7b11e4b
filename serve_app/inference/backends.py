"""What runs emotion2vec's encoder: eager PyTorch, or the same graph compiled by OpenVINO.

Both give the engine the same two calls on waveforms already normalised per clip:
- `single(source)`: 1 x T x D float32 frames of one clip (or window);
- `batch(sources)`: B x T_max x D float32 frames of clips of any lengths, and each clip's T_i.

`torch` is FunASR's own modules, in eager mode (padded batches through
serve_app.inference.padded). `openvino` converts serve_app.inference.graph.PaddedEncoder, the same
steps as one graph with dynamic batch and length, to OpenVINO's IR once per checkpoint and
compiles it for this CPU: any clip length and batch size run without recompiling. fp32 runs in
f32 (its scores equal FunASR's within float rounding); `precision: reduced` runs in bf16 where
the CPU has bf16 units (else f32, said in the note).

Artefacts are cached on disk under `compiled_cache_dir/<key>/`, the key a sha256 of everything
that changes them: the checkpoint's sha256, backend and OpenVINO and torch versions, the CPU's
model and flags, and the source of the code that builds them (graph.py, this file). The IR is
written once per key (atomic rename: replicas that build it at once do not clash); OpenVINO's
own blob cache beside it (per precision) makes a warm compile an import.

A backend that cannot run here (not installed, a conversion or compile that fails, a CPU
without what it needs, results that differ from eager on a check clip) leaves the engine on
eager PyTorch, with the reason in `note`: a replica never fails for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from serve_app.inference import graph, padded

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "openvino")
IR_NAME = "encoder.xml"
CHECK_SAMPLES = 24_000  # 1.5 s: the check clip run on both backends at load
# OpenVINO 2026.4's bf16 kernels go wrong on inputs of a few frames (0.08 off in scores below
# ~0.25 s, measured); padded to 1 s (the mask keeps padding out) they are right, in f32 alike.
MIN_WIDTH = 16_000
# Largest difference from eager allowed on the check clip's scores: float rounding in f32,
# a sanity bound in bf16 (the fidelity benchmark holds turbo to far tighter bounds).
CHECK_TOLERANCE = {"fp32": 1e-4, "reduced": 5e-2}


class BackendUnavailable(RuntimeError):
    """The backend cannot run here; the engine stays on eager PyTorch."""


@dataclass
class BackendInfo:
    requested: str
    backend: str               # what runs
    precision: str             # f32 / bf16 / f16: what the encoder computes in
    note: str | None = None    # why the requested backend does not run, or what it fell back to
    build_s: float = 0.0       # conversion and compile time at load
    cache: str | None = None   # hit (artefacts reused) or miss (built now); None for torch
    cache_dir: str | None = None


class EagerBackend:
    """FunASR's modules in eager PyTorch, under autocast for reduced precision."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, autocast):
        self.model = model
        self._autocast = autocast

    def single(self, source: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            frames = self.model.extract_features(source.view(1, -1), padding_mask=None)["x"]
        return frames.float()

    def batch(self, sources: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            frames, lengths = padded.padded_features(self.model, sources)
        return frames.float(), lengths


def _padded(sources: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in sources], dtype=np.int64)
    waveform = np.zeros((len(sources), max(MIN_WIDTH, int(lengths.max()))), dtype=np.float32)
    for i, source in enumerate(sources):
        waveform[i, :len(source)] = source.cpu().numpy()
    return waveform, lengths


class OpenVinoBackend:
    """PaddedEncoder compiled by OpenVINO for this CPU; dynamic batch and length."""

    name = "openvino"

    def __init__(self, compiled, model: torch.nn.Module):
        self._request = compiled.create_infer_request()
        self._lengths = lambda samples: padded.frame_lengths(model, samples)

    def _run(self, waveform: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        self._request.infer([waveform, lengths])
        # Copied out: the request reuses its output buffer on the next call.
        return torch.from_numpy(self._request.get_output_tensor(0).data.copy())

    def single(self, source: torch.Tensor) -> torch.Tensor:
        frames, lengths = self.batch([source])
        return frames[:, :int(lengths[0])]

    def batch(self, sources: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        waveform, lengths = _padded(sources)
        frames = self._run(waveform, lengths)
        return frames, self._lengths(torch.from_numpy(lengths))


def _cpu_identity() -> dict:
    """The CPU model and feature flags: a compiled blob is only valid on the same kind."""
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


def _code_digest() -> str:
    digest = hashlib.sha256()
    for path in (Path(graph.__file__), Path(__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(checkpoint_sha256: str, backend: str) -> dict:
    """Everything that changes a backend's artefacts (its sha256 names their folder)."""
    import openvino

    return {"checkpoint_sha256": checkpoint_sha256, "backend": backend,
            "openvino": openvino.__version__, "torch": torch.__version__,
            "cpu": _cpu_identity(), "code": _code_digest()}


def _key_dir(root: Path, key: dict) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return root / name


def _convert(model: torch.nn.Module, target: Path, key: dict) -> None:
    """Trace PaddedEncoder into OpenVINO's IR and publish it at `target` atomically."""
    import openvino as ov

    encoder = graph.PaddedEncoder(model).eval()
    example = (torch.zeros(1, 16_000), torch.tensor([16_000]))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # no_grad, not inference_mode: a trace cannot hold inference tensors.
        with torch.no_grad():
            converted = ov.convert_model(
                encoder, example_input=example,
                input=[(ov.PartialShape([-1, -1]), ov.Type.f32),
                       (ov.PartialShape([-1]), ov.Type.i64)])
        ov.save_model(converted, staging / IR_NAME, compress_to_fp16=False)
        del converted
        (staging / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True))
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / IR_NAME).is_file():  # not another writer's complete copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """One converter per key at a time on this node (large and turbo share a checkpoint):
    the others wait, then find the IR written. Without file locks, the atomic rename holds."""
    with open(lock_path, "w") as handle:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def release_encoder(model: torch.nn.Module) -> None:
    """Free the torch encoder once a compiled backend holds its own copy of the weights: only
    the head (copied out of the checkpoint's mapping, so that the mapping can go) is used
    after load. Keeps a replica's RSS near one copy of the weights."""
    for parameter in model.proj.parameters():
        parameter.data = parameter.data.clone()
    for name, child in model.named_children():
        if name != "proj":
            child.to("meta")
    getattr(model, "alibi_biases", {}).clear()  # FunASR's ALiBi cache (the check clip's)


def has_bf16(core=None) -> bool:
    """Whether OpenVINO runs bf16 on this CPU (AVX-512 bf16 or AMX units)."""
    import openvino as ov

    core = core or ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _ov_precision(core, precision: str) -> tuple[str, str | None]:
    """OpenVINO's inference precision for a setting, and a note when reduced is not there."""
    if precision == "fp32":
        return "f32", None
    if has_bf16(core):
        return "bf16", None
    return "f32", "this CPU has no bf16 units: reduced precision runs in f32"


def build_openvino(model: torch.nn.Module, precision: str, threads: int,
                   checkpoint_sha256: str | None, cache_root: Path
                   ) -> tuple[OpenVinoBackend, BackendInfo]:
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailable(f"openvino is not installed ({exc})") from exc
    try:
        padded.check_supported(model)
    except padded.UnsupportedModel as exc:
        raise BackendUnavailable(str(exc)) from exc
    started = time.perf_counter()
    key = cache_key(checkpoint_sha256 or "unhashed", "openvino")
    folder = _key_dir(cache_root.expanduser(), key)
    hit = (folder / IR_NAME).is_file() and checkpoint_sha256 is not None
    if checkpoint_sha256 is None:  # no file to key on: build in a private folder
        folder = Path(tempfile.mkdtemp(prefix="e2v-openvino-")) / "ir"
    if not hit:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder.with_name(folder.name + ".lock")):
            hit = (folder / IR_NAME).is_file()  # written by another replica meanwhile
            if not hit:
                logger.info("openvino: converting the encoder to %s", folder)
                _convert(model, folder, key)
    core = ov.Core()
    ov_precision, note = _ov_precision(core, precision)
    blobs = folder / f"blobs-{ov_precision}"
    compiled = core.compile_model(str(folder / IR_NAME), "CPU", {
        "INFERENCE_PRECISION_HINT": ov_precision,
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "CACHE_DIR": str(blobs),
    })
    info = BackendInfo("openvino", "openvino", ov_precision, note,
                       round(time.perf_counter() - started, 3), "hit" if hit else "miss",
                       str(folder))
    return OpenVinoBackend(compiled, model), info


def check_against_eager(backend, eager: EagerBackend, head, tolerance: float) -> float:
    """Largest score difference between `backend` and eager on a fixed noise clip; raises
    BackendUnavailable beyond `tolerance` (a compiler that changes the answers is not used)."""
    noise = np.random.default_rng(7).standard_normal(CHECK_SAMPLES).astype(np.float32) * 0.1
    source = torch.from_numpy(noise)
    source = F.layer_norm(source, source.shape)
    with torch.inference_mode():
        ours = torch.softmax(head(backend.single(source).mean(dim=1)), dim=-1)
        theirs = torch.softmax(head(eager.single(source).mean(dim=1)), dim=-1)
    diff = float((ours - theirs).abs().max())
    if not diff <= tolerance:
        raise BackendUnavailable(f"scores differ from eager by {diff:.2e} on the check clip "
                                 f"(allowed {tolerance:g})")
    return diff


def select(settings, model: torch.nn.Module, device: str, threads: int,
           checkpoint_sha256: str | None, autocast) -> tuple[object, BackendInfo]:
    """The backend `settings.backend` asks for, or eager PyTorch with the reason why not."""
    eager = EagerBackend(model, autocast)
    eager_precision = "f32" if settings.precision == "fp32" else (
        "f16" if device.startswith("cuda") else "bf16")
    if settings.backend == "torch":
        return eager, BackendInfo("torch", "torch", eager_precision)
    try:
        if device != "cpu":
            raise BackendUnavailable(f"{settings.backend} runs on the CPU, not on {device}")
        backend, info = build_openvino(model, settings.precision, threads, checkpoint_sha256,
                                       Path(settings.compiled_cache_dir))
        check_against_eager(backend, eager, model.proj, CHECK_TOLERANCE[settings.precision])
        release_encoder(model)
        return backend, info
    except Exception as exc:  # any failure of an optional backend: serve on eager
        reason = f"{settings.backend} unavailable, running eager torch: {exc}"
        logger.warning("%s", reason)
        return eager, BackendInfo(settings.backend, "torch", eager_precision, reason)
