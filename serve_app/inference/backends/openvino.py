"""`backend: openvino`: serve_app.inference.graph.PaddedEncoder converted to OpenVINO's IR once
per checkpoint (cached: serve_app/inference/backends/common.py) and compiled for this CPU, with
dynamic batch and length: any clip length and batch size run without recompiling. fp32 runs in
f32 (its scores equal FunASR's within float rounding); `precision: reduced` runs in bf16 where
the CPU has bf16 units (else f32, said in the note). OpenVINO's own blob cache beside the IR
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


def load(artefact: Artefact, model: torch.nn.Module, spec: BuildSpec
         ) -> tuple[OpenVinoBackend, BackendInfo]:
    """The IR compiled for this CPU (an import where the blob cache has it)."""
    import openvino as ov

    core = ov.Core()
    ov_precision, note = _ov_precision(core, spec.precision)
    compiled = core.compile_model(str(artefact.folder / IR_NAME), "CPU", {
        "INFERENCE_PRECISION_HINT": ov_precision,
        "INFERENCE_NUM_THREADS": spec.threads,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "CACHE_DIR": str(artefact.folder / f"blobs-{ov_precision}-{cpu_tag()}"),
    })
    return OpenVinoBackend(compiled, model), compiled_info("openvino", ov_precision, note,
                                                           artefact)
