"""emotion2vec as ONNX graphs, written by torch's TorchScript-based exporter (no Ray).

Both graphs are PaddedEncoder (serve_app/inference/graph.py) with `convolution="conv1d"`, one
graph for any batch size and clip length:
- the encoder alone (`backend: onnxruntime`, serve_app/inference/backends/onnxruntime.py):
  inputs `waveform` (B x S float32, each clip already normalised, zero-padded) and `lengths`
  (B int64 samples), output `frames` (B x T x D float32);
- `ClipClassifier` (`emotion2vec-serve export --format onnx`, serve_app/tools/export.py):
  inputs the raw waveform and lengths; in the graph the per-clip normalisation (when the
  model's config says `normalize: true`), the mean over each clip's own frames, the head and
  FunASR's softmax over the labels it scores (those not named "unuse*"); outputs `scores`,
  `logits` and `embedding`.

The weights are always written as external data, in one file beside the graph
(`model.onnx` -> `model.onnx.data`): the graph file stays small whatever the model, and no
model meets protobuf's 2 GB limit on a single file. onnxruntime finds the file beside the
graph. The TorchScript exporter (`dynamo=False`) traces this graph as it is; it needs the
`onnx` package (which also writes the external data), the torch.export-based one would need
`onnxscript` too.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from serve_app import labels as label_sets
from serve_app.inference.graph import PaddedEncoder

OPSET = 17
EXTERNAL_DATA_SUFFIX = ".data"
# FunASR's F.layer_norm(source, source.shape): no affine, this epsilon
NORM_EPS = 1e-5
ENCODER_IO = (["waveform", "lengths"], ["frames"],
              {"waveform": {0: "batch", 1: "samples"}, "lengths": {0: "batch"},
               "frames": {0: "batch", 1: "frames"}})
CLASSIFIER_IO = (["waveform", "lengths"], ["scores", "logits", "embedding"],
                 {"waveform": {0: "batch", 1: "samples"}, "lengths": {0: "batch"},
                  "scores": {0: "batch"}, "logits": {0: "batch"}, "embedding": {0: "batch"}})


def encoder_graph(model: nn.Module) -> PaddedEncoder:
    return PaddedEncoder(model, convolution="conv1d").eval()


class ClipClassifier(nn.Module):
    """scores, logits (B x C, the scored labels in head order), embedding (B x D) =
    ClipClassifier(model, labels)(waveform B x S raw float32 at 16 kHz, lengths B int64).

    Clip i is waveform[i, :lengths[i]]; what follows it is ignored. Each clip needs at least
    400 samples (25 ms): fewer give no frame."""

    def __init__(self, model: nn.Module, labels: Sequence[str]):
        super().__init__()
        self.encoder = encoder_graph(model)
        self.head = model.proj
        self.normalize = bool(model.cfg.get("normalize", False))
        self.register_buffer("scored", torch.tensor(label_sets.usable(labels)),
                             persistent=False)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor):
        inside = torch.arange(waveform.size(1), device=waveform.device).unsqueeze(0) \
            < lengths.unsqueeze(1)
        waveform = torch.where(inside, waveform, torch.zeros_like(waveform))
        if self.normalize:  # layer norm over each clip's own samples, as FunASR's inference
            count = lengths.unsqueeze(1).to(waveform.dtype)
            mean = waveform.sum(dim=1, keepdim=True) / count
            centred = torch.where(inside, waveform - mean, torch.zeros_like(waveform))
            variance = (centred * centred).sum(dim=1, keepdim=True) / count
            waveform = centred * torch.rsqrt(variance + NORM_EPS)
        frames = self.encoder(waveform, lengths)
        counts = self.encoder.frame_lengths(lengths)
        valid = torch.arange(frames.size(1), device=frames.device).unsqueeze(0) \
            < counts.unsqueeze(1)
        frames = torch.where(valid.unsqueeze(-1), frames, torch.zeros_like(frames))
        embedding = frames.sum(dim=1) / counts.unsqueeze(1).to(frames.dtype)
        # Softmax over the scored labels alone: FunASR's -inf for the others, then dropping them.
        logits = self.head(embedding).index_select(1, self.scored)
        return torch.softmax(logits, dim=-1), logits, embedding


def write_onnx(module: nn.Module, io: tuple, path: Path) -> None:
    """Export `module` (inputs: waveform B x S float32, lengths B int64) to `path`, with
    dynamic batch and length, weights in `path.name + ".data"` beside it."""
    import onnx

    input_names, output_names, dynamic_axes = io
    path = Path(path)
    weights = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    example = (torch.zeros(2, 16_000), torch.tensor([16_000, 12_000]))
    with tempfile.TemporaryDirectory(prefix=".onnx-export-", dir=path.parent) as scratch:
        traced = Path(scratch) / path.name
        # no_grad, not inference_mode: a trace cannot hold inference tensors.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            torch.onnx.export(module.eval(), example, str(traced), input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes,
                              opset_version=OPSET, do_constant_folding=True, dynamo=False)
        proto = onnx.load(str(traced))
        for stale in (path, weights):  # onnx appends to an existing data file
            stale.unlink(missing_ok=True)
        onnx.save_model(proto, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=weights.name, size_threshold=0)
    shutil.copymode(path, weights)  # onnx makes the data file private; the graph's mode is ours
