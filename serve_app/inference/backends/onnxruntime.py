"""`backend: onnxruntime`: serve_app.inference.graph.PaddedEncoder exported to ONNX once per
checkpoint (serve_app/inference/onnx_graph.py; cached as the OpenVINO IR is:
serve_app/inference/backends/common.py) and run by onnxruntime's CPUExecutionProvider on the
replica's threads, with dynamic batch and length. It computes in f32 (its scores equal FunASR's
within float rounding); `precision: reduced` runs in f32 too, said in the note: onnxruntime's
CPU provider has no bf16 kernels for this graph. The session optimises the graph when it is
made (part of build_s on every load); only the exported model is cached.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from serve_app.inference import onnx_graph
from serve_app.inference.backends.common import (
    Artefact,
    BackendInfo,
    BackendUnavailable,
    BuildSpec,
    PaddedGraphBackend,
    cache_key,
    cached_artefact,
    compiled_info,
)

COMPILED = True
MODEL_NAME = "encoder.onnx"


class OnnxRuntimeBackend(PaddedGraphBackend):
    """PaddedEncoder's ONNX export in an onnxruntime session; dynamic batch and length."""

    name = "onnxruntime"

    def __init__(self, session, model: torch.nn.Module):
        super().__init__(model)
        self._session = session

    def _run(self, waveform: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        (frames,) = self._session.run(["frames"], {"waveform": waveform, "lengths": lengths})
        return torch.from_numpy(np.ascontiguousarray(frames))


def session(path, threads: int):
    """An onnxruntime CPU session of the model at `path` on `threads` threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings about shapes are expected here
    # Its threads spin-wait after each run by default: CPU time that the other replicas on the
    # node's cores need (base, 5 s clip, 2 threads: 614 ms of CPU spinning, 526 ms not, for
    # 486 and 513 ms wall).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def convert(model: torch.nn.Module, spec: BuildSpec) -> Artefact:
    """The ONNX model in the cache, exported from the torch encoder on a miss."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailable(f"onnxruntime or onnx is not installed ({exc})") from exc
    key = cache_key(spec.checkpoint_sha256, "onnxruntime",
                    {"onnxruntime": ort.__version__, "onnx": onnx.__version__,
                     "opset": onnx_graph.OPSET},
                    [onnx_graph, sys.modules[__name__]])
    return cached_artefact(
        spec.cache_root, key, MODEL_NAME,
        lambda staging: onnx_graph.write_onnx(onnx_graph.encoder_graph(model),
                                              onnx_graph.ENCODER_IO, staging / MODEL_NAME))


def load(artefact: Artefact, model: torch.nn.Module, spec: BuildSpec
         ) -> tuple[OnnxRuntimeBackend, BackendInfo]:
    note = None if spec.precision == "fp32" else (
        "onnxruntime's CPU provider runs this graph in f32: reduced precision is not applied")
    backend = OnnxRuntimeBackend(session(artefact.folder / MODEL_NAME, spec.threads), model)
    return backend, compiled_info("onnxruntime", "f32", note, artefact)
