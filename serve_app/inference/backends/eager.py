"""`backend: torch`: FunASR's own modules in eager PyTorch, on any device; padded batches
through serve_app.inference.padded; reduced precision is the engine's autocast around them
(bf16 on the CPU, f16 on CUDA). Every other backend is checked against this one."""

from __future__ import annotations

import torch

from serve_app.inference import padded
from serve_app.inference.backends.common import BackendInfo, BuildSpec

COMPILED = False


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


def build(model: torch.nn.Module, spec: BuildSpec) -> tuple[EagerBackend, BackendInfo]:
    precision = "f32" if spec.precision == "fp32" else (
        "f16" if spec.device.startswith("cuda") else "bf16")
    return EagerBackend(model, spec.autocast), BackendInfo("torch", "torch", precision)
