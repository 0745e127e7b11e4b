"""A padded batched forward pass through emotion2vec that gives each clip its own result.

FunASR's `extract_features(source, padding_mask=...)` is not exact for padded batches: its
relative positional encoder (5 stacked same-padded convolutions) runs over the padded frames
too, so the last ~45 valid frames of every shorter clip see padding instead of zeros, and the
error then spreads through attention to every frame. This module runs the same steps as
`Emotion2vec.extract_features` (mask=False) with the model's own submodules and weights, and
keeps padding out of each step:

- waveform layer-norm per clip, over its own samples, before padding;
- conv feature extractor (layer_norm mode: every op is per frame, kernels look only forward):
  a clip's frames are the first T_i output frames, T_i from FunASR's own length formula;
- positional convs: padded frames are set to zero before every conv, as the clip's own zero
  padding would be;
- attention: FunASR's key padding mask (-inf before the softmax) with the ALiBi bias, which
  depends only on |i - j|, so a clip's block of the padded bias is the bias it would get alone.

The ALiBi bias is asked for with batch_size=1 and broadcast over the batch: FunASR's cache
then stays heads x T x T for the longest clip, as one single-clip call would leave it, instead
of growing to batch x heads x T x T.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class UnsupportedModel(ValueError):
    """The model's configuration has a part this padded pass cannot keep exact."""


def check_supported(model: nn.Module) -> None:
    """Raise UnsupportedModel unless every step of `model` is one `padded_features` handles."""
    enc = model.modality_encoders["AUDIO"]
    cfg = enc.modality_cfg
    problems = []
    # "default" mode group-normalises the first conv layer over time: padding would shift it.
    if cfg.extractor_mode != "layer_norm":
        problems.append(f"extractor_mode={cfg.extractor_mode}")
    if enc.fixed_positional_encoder is not None:
        problems.append("a fixed positional encoder")
    if cfg.get("learned_alibi", False):
        problems.append("learned ALiBi")
    if not _positional_layers(enc.relative_positional_encoder):
        problems.append("an unknown positional encoder layout")
    if problems:
        raise UnsupportedModel("padded batching does not support " + ", ".join(problems))


def _positional_layers(pos: nn.Module | None) -> list[nn.Sequential] | None:
    """The conv layers of FunASR's positional encoder, each Sequential(Conv1d, ...) on B x C x T.

    Layout: [LayerNorm?] TransposeLast, (Conv1d, SamePad, TransposeLast, LayerNorm,
    TransposeLast, GELU) x depth, TransposeLast. None when it is something else.
    """
    if pos is None:
        return None
    modules = list(pos.children())
    if len(modules) == 2 and isinstance(modules[0], nn.LayerNorm):  # conv_pos_pre_ln
        modules = list(modules[1].children())
    layers = modules[1:-1]
    if len(modules) < 3 or not all(isinstance(layer, nn.Sequential)
                                   and isinstance(layer[0], nn.Conv1d) for layer in layers):
        return None
    return layers


def frame_lengths(model: nn.Module, sample_lengths: torch.Tensor) -> torch.Tensor:
    """Frames the conv feature extractor gives for clips of `sample_lengths` samples."""
    lengths = sample_lengths.double()
    for _, kernel, stride in model.modality_encoders["AUDIO"].feature_enc_layers:
        lengths = torch.floor((lengths - kernel) / stride + 1)
    return lengths.long()


def padded_features(model: nn.Module, sources: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames for 1-D waveforms of any lengths, in one forward pass.

    `sources` are already normalised as the model expects (per clip). Returns frames
    (B x T_max x D) and each clip's frame count T_i; frames i, :T_i are clip i's frames,
    the rest are padding with no meaning.
    """
    enc = model.modality_encoders["AUDIO"]
    device = sources[0].device
    sample_lengths = torch.tensor([len(s) for s in sources], device=device)
    waveform = torch.zeros(len(sources), int(sample_lengths.max()), dtype=sources[0].dtype,
                           device=device)
    for i, source in enumerate(sources):
        waveform[i, :len(source)] = source

    x = enc.local_features(waveform)  # B x T x D
    lengths = frame_lengths(model, sample_lengths)
    padding = torch.arange(x.size(1), device=device)[None, :] >= lengths[:, None]  # B x T

    x = x + _positional(enc, x, padding)

    alibi_bias, alibi_scale = _alibi(enc, x.size(1), device)
    if enc.extra_tokens is not None:
        num = enc.extra_tokens.size(1)
        x = torch.cat([enc.extra_tokens.expand(x.size(0), -1, -1), x], dim=1)
        padding = F.pad(padding, (num, 0))
        if alibi_bias is not None:
            alibi_bias = F.pad(alibi_bias, (num, 0, num, 0))

    prenet_depth = enc.modality_cfg.prenet_depth
    x = enc.context_encoder(x, padding, alibi_bias,
                            alibi_scale[:prenet_depth] if alibi_scale is not None else None)
    if alibi_scale is not None and alibi_scale.size(0) > 1:
        alibi_scale = alibi_scale[prenet_depth:]

    # The main blocks, as Emotion2vec.forward runs them in eval mode.
    x = model.dropout_input(x)
    for i, block in enumerate(model.blocks):
        bias = alibi_bias
        if bias is not None and alibi_scale is not None:
            scale = alibi_scale[i] if alibi_scale.size(0) > 1 else alibi_scale.squeeze(0)
            bias = bias * scale.type_as(bias)
        x, _ = block(x, padding_mask=padding, alibi_bias=bias)
    if model.norm is not None:
        x = model.norm(x)
    return x[:, enc.modality_cfg.num_extra_tokens:], lengths


def _positional(enc: nn.Module, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """The relative positional encoder, with padded frames zeroed before each conv.

    Alone, a clip's convs see zeros past its end (their own zero padding); in a batch they
    would see the padded frames, which are not zero after the first layer.
    """
    pos = enc.relative_positional_encoder
    layers = _positional_layers(pos)
    if isinstance(pos[0], nn.LayerNorm):  # conv_pos_pre_ln: per frame, so padding-safe
        x = pos[0](x)
    h = x.transpose(1, 2)  # B x C x T
    pad = padding[:, None, :]
    for layer in layers:
        h = layer(h.masked_fill(pad, 0.0))
    return h.transpose(1, 2)


def _alibi(enc: nn.Module, frames: int, device: torch.device
           ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The ALiBi bias (1 x H x T x T, broadcast over the batch) and any per-layer scales left."""
    if enc.get_alibi_bias is None:
        return None, None
    bias = enc.get_alibi_bias(batch_size=1, time_steps=frames,
                              heads=enc.modality_cfg.num_alibi_heads,
                              dtype=torch.float32, device=device)
    scale = enc.alibi_scale
    if scale is not None:
        scale = scale.clamp_min(0)
        if scale.size(0) == 1:
            bias = bias * scale.squeeze(0).type_as(bias)
            scale = None
    return bias, scale
