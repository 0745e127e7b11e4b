"""`backend: openvino`: serve_app.inference.graph.PaddedEncoder converted to OpenVINO's IR once
per checkpoint (cached: serve_app/inference/backends/common.py) and compiled for this CPU, with
dynamic batch and length: any clip length and batch size run without recompiling. fp32 runs in
f32 (its scores equal FunASR's within float rounding); `precision: reduced` runs in bf16 where
the CPU has bf16 units (else f32, said in the note); `precision: int8` is this IR quantised
by NNCF (int8.py), refused for reduced (FALLBACK) where it cannot run or fails its check.
OpenVINO's own blob cache beside the IR
(per precision and CPU kind) makes a warm compile an import. It maps the IR (or the blob)
rather than reading it; the copy it compiles the weights into is the replica's only one once
the mapped pages are handed back (common.select).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from serve_app.inference import graph
from serve_app.inference.backends.common import (
    Artefact,
    BackendInfo,
    BackendUnavailable,
    BuildSpec,
    PaddedGraphBackend,
    cache_key,
    cached_artefact,
    compiled_info,
    cpu_tag,
)

COMPILED = True
# A precision refused at load (not built, or beyond its check bound): the one tried instead.
FALLBACK = {"int8": "reduced"}
IR_NAME = "encoder.xml"
# OpenVINO 2026.4's bf16 kernels go wrong on inputs of a few frames (0.08 off in scores below
# ~0.25 s, measured); padded to 1 s (the mask keeps padding out) they are right, in f32 alike.
MIN_WIDTH = 16_000


class OpenVinoBackend(PaddedGraphBackend):
    """PaddedEncoder compiled by OpenVINO for this CPU; dynamic batch and length."""

    name = "openvino"
    MIN_WIDTH = MIN_WIDTH

    def __init__(self, compiled, model: torch.nn.Module):
        super().__init__(model)
        self._request = compiled.create_infer_request()

    def _run(self, waveform: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        self._request.infer([waveform, lengths])
        # Copied out: the request reuses its output buffer on the next call.
        return torch.from_numpy(self._request.get_output_tensor(0).data.copy())


def _convert(model: torch.nn.Module, folder: Path) -> None:
    """Trace PaddedEncoder into OpenVINO's IR in `folder`."""
    import openvino as ov

    encoder = graph.PaddedEncoder(model).eval()
    example = (torch.zeros(1, 16_000), torch.tensor([16_000]))
    # no_grad, not inference_mode: a trace cannot hold inference tensors.
    with torch.no_grad():
        converted = ov.convert_model(
            encoder, example_input=example,
            input=[(ov.PartialShape([-1, -1]), ov.Type.f32),
                   (ov.PartialShape([-1]), ov.Type.i64)])
    ov.save_model(converted, folder / IR_NAME, compress_to_fp16=False)


def has_bf16() -> bool:
    """Whether OpenVINO runs bf16 on this CPU (AVX-512 bf16 or AMX units)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _ov_precision(precision: str) -> tuple[str, str | None]:
    """OpenVINO's inference precision for a setting, and a note when reduced is not there."""
    if precision == "fp32":
        return "f32", None
    if has_bf16():
        return "bf16", None
    return "f32", "this CPU has no bf16 units: reduced precision runs in f32"


def convert(model: torch.nn.Module, spec: BuildSpec) -> Artefact:
    """The IR in the cache, traced from the torch encoder on a miss."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailable(f"openvino is not installed ({exc})") from exc
    key = cache_key(spec.checkpoint_sha256, "openvino", {"openvino": ov.__version__},
                    [sys.modules[__name__]])
    return cached_artefact(spec.cache_root, key, IR_NAME,
                           lambda staging: _convert(model, staging))


def compile_ir(path: Path, inference_precision: str, threads: int):
    """The IR at `path` compiled for this CPU (an import where its blob cache, beside it per
    precision and CPU kind, has it)."""
    import openvino as ov

    return ov.Core().compile_model(str(path), "CPU", {
        "INFERENCE_PRECISION_HINT": inference_precision,
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "CACHE_DIR": str(path.parent / f"blobs-{inference_precision}-{cpu_tag()}"),
    })


def load(artefact: Artefact, model: torch.nn.Module, spec: BuildSpec
         ) -> tuple[OpenVinoBackend, BackendInfo]:
    """The IR compiled for this CPU; for int8, the IR quantised first (int8.py)."""
    if spec.precision == "int8":
        from serve_app.inference.backends import int8

        return int8.load(artefact, model, spec)
    ov_precision, note = _ov_precision(spec.precision)
    compiled = compile_ir(artefact.folder / IR_NAME, ov_precision, spec.threads)
    return OpenVinoBackend(compiled, model), compiled_info("openvino", ov_precision, note,
                                                           artefact)
