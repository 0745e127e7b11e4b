"""What runs emotion2vec's encoder: one module per backend, named by the `backend` setting.

| name | module | what |
| --- | --- | --- |
| `torch` | eager.py | FunASR's modules in eager PyTorch (any device) |
| `openvino` | openvino.py | PaddedEncoder converted to OpenVINO's IR, compiled for this CPU |
| (`precision: int8`) | int8.py | openvino's IR quantised by NNCF; openvino reduced where refused |
| `onnxruntime` | onnxruntime.py | PaddedEncoder exported to ONNX, run by onnxruntime on the CPU |

The interface, the registry, the artefact cache, the order that keeps one copy of the weights
and the fall-back to eager with the reason are common.py's. Adding a backend: one module with
`COMPILED` and `build` (eager) or `convert` and `load` (compiled), one name in
common.REGISTRY, and the same name in serve_app.config.BackendName.
"""

from serve_app.inference.backends.common import (
    REGISTRY,
    Artefact,
    Backend,
    BackendInfo,
    BackendUnavailable,
    BuildSpec,
    backend_module,
    cache_key,
    check_against_eager,
    check_scores,
    release_encoder,
    select,
)
from serve_app.inference.backends.eager import EagerBackend
from serve_app.inference.backends.openvino import has_bf16

__all__ = ["REGISTRY", "Artefact", "Backend", "BackendInfo", "BackendUnavailable", "BuildSpec",
           "EagerBackend", "backend_module", "cache_key", "check_against_eager", "check_scores",
           "has_bf16",
           "release_encoder", "select"]
