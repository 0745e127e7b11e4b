"""emotion2vec's padded forward pass as one traceable graph, for the compiled backends.

`PaddedEncoder(model)` computes what serve_app.inference.padded.padded_features computes (and
so, clip by clip, what FunASR's `extract_features` gives each clip alone), with the model's own
weights, but written so that a tracer or compiler sees one graph with no Python decisions that
depend on the data or the length:

- inputs are a zero-padded B x S waveform (each clip already layer-normalised over its own
  samples) and each clip's sample count; any B and S run through the same graph;
- the frame count per clip and the padding mask are computed in the graph (FunASR's length
  formula in integers);
- the ALiBi bias is computed in the graph from the frame count (FunASR caches one per length
  in Python, which a trace would bake in), bit for bit FunASR's values: slope x -|i - j|;
- attention always applies the padding mask (FunASR skips it when nothing is padded: adding
  -inf nowhere is the same) and adds the bias and mask as one float32 tensor before softmax;
- the conv feature extractor runs in frames x channels layout: each conv is an unfold and a
  matrix product, so the per-frame layer norms need no transposes (same sums, another order).
  `convolution="conv1d"` runs each as a plain Conv1d instead (FunASR's own layout): the
  TorchScript ONNX exporter cannot export an unfold of a dynamic length, and ONNX's Conv is
  what onnxruntime has fast kernels for.

Reduced precision is autocast around this module, as in the eager path: the layer norms of the
feature extractor, the attention softmax and the bias stay float32, as FunASR keeps them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from serve_app.inference import padded


class PaddedEncoder(nn.Module):
    """frames (B x T x D, float32) = PaddedEncoder(model)(waveform B x S, sample_lengths B)."""

    def __init__(self, model: nn.Module, convolution: str = "unfold"):
        super().__init__()
        padded.check_supported(model)
        if convolution not in ("unfold", "conv1d"):
            raise ValueError(f"convolution must be unfold or conv1d, not {convolution!r}")
        self.convolution = convolution
        enc = model.modality_encoders["AUDIO"]
        cfg = enc.modality_cfg
        self.conv_specs = [(kernel, stride) for _, kernel, stride in enc.feature_enc_layers]
        # Each layer_norm-mode block: Conv1d (no bias), Dropout, (Transpose, Fp32LayerNorm,
        # Transpose), GELU.
        self.convs = nn.ModuleList(block[0] for block in enc.local_encoder.conv_layers)
        self.conv_norms = nn.ModuleList(block[2][1] for block in enc.local_encoder.conv_layers)
        self.feature_norm, self.feature_proj = enc.project_features[1], enc.project_features[2]
        pos = enc.relative_positional_encoder
        self.pos_pre_norm = pos[0] if isinstance(pos[0], nn.LayerNorm) else None
        self.pos_layers = nn.ModuleList(padded._positional_layers(pos))
        self.extra_tokens = enc.extra_tokens
        self.num_extra = cfg.num_extra_tokens if enc.extra_tokens is not None else 0
        self.heads = cfg.num_alibi_heads
        self.prenet = enc.context_encoder
        self.prenet_depth = cfg.prenet_depth
        self.blocks = model.blocks
        self.norm = model.norm
        self.has_alibi = enc.get_alibi_bias is not None
        self.alibi_scale = enc.alibi_scale
        # one learned scale for all layers, or one per layer (a shape: fixed per model)
        self.scale_per_layer = enc.alibi_scale is not None and enc.alibi_scale.size(0) > 1
        if self.has_alibi:
            from funasr.models.emotion2vec.base import get_alibi

            # FunASR's slopes, as its own function computes them (bias[h, 0, 1] = -slope[h]).
            self.register_buffer("slopes", -get_alibi(2, self.heads)[:, 0, 1].clone(),
                                 persistent=False)

    # -- the steps -----------------------------------------------------------------------
    def frame_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        lengths = sample_lengths
        for kernel, stride in self.conv_specs:
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths

    def local_features(self, waveform: torch.Tensor) -> torch.Tensor:
        """B x S -> B x T x D: the conv stack in B x T x C layout, then the projection."""
        if self.convolution == "conv1d":
            h = waveform.unsqueeze(1)  # B x 1 x S
            for (_, stride), conv, norm in zip(self.conv_specs, self.convs, self.conv_norms):
                h = F.conv1d(h, conv.weight, stride=stride).transpose(1, 2)  # B x T' x C
                h = F.gelu(norm(h)).transpose(1, 2)
            return self.feature_proj(self.feature_norm(h.transpose(1, 2)))
        h = waveform.unsqueeze(-1)  # B x S x 1
        for (kernel, stride), conv, norm in zip(self.conv_specs, self.convs, self.conv_norms):
            patches = h.unfold(1, kernel, stride)  # B x T' x C x k
            patches = patches.reshape(patches.size(0), patches.size(1), -1)
            h = F.linear(patches, conv.weight.reshape(conv.weight.size(0), -1))
            h = F.gelu(norm(h))  # Fp32LayerNorm over channels, then GELU, as FunASR
        return self.feature_proj(self.feature_norm(h))

    def positional(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        if self.pos_pre_norm is not None:
            x = self.pos_pre_norm(x)
        h = x.transpose(1, 2)
        pad = padding.unsqueeze(1)
        for layer in self.pos_layers:
            h = layer(h.masked_fill(pad, 0.0))
        return h.transpose(1, 2)

    def alibi(self, frames: int, device: torch.device) -> torch.Tensor:
        """1 x H x T x T, FunASR's get_alibi values (float32)."""
        positions = torch.arange(frames, device=device)
        distance = (positions.unsqueeze(0) - positions.unsqueeze(1)).abs() * -1
        return (self.slopes.view(-1, 1, 1) * distance.unsqueeze(0)).unsqueeze(0)

    @staticmethod
    def attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """FunASR's AltAttention with `bias` (B|1 x H x N x N, float32, -inf where padded)."""
        batch, tokens, channels = x.shape
        heads = attn.num_heads
        qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, channels // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dtype = q.dtype
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        weights = (scores.float() + bias).softmax(dim=-1, dtype=torch.float32).to(dtype)
        out = (weights @ v).transpose(1, 2).reshape(batch, tokens, channels)
        return attn.proj(out)

    def block(self, blk: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """FunASR's AltBlock in eval mode (drop paths and dropouts are identities)."""
        if blk.layer_norm_first:
            x = x + self.attention(blk.attn, blk.norm1(x), bias)
            r = x = blk.mlp(blk.norm2(x))
            return r + x
        x = x + self.attention(blk.attn, x, bias)
        r = x = blk.norm1(x)
        return blk.norm2(r + blk.mlp(x))

    def forward(self, waveform: torch.Tensor, sample_lengths: torch.Tensor) -> torch.Tensor:
        x = self.local_features(waveform)
        frames = x.size(1)
        lengths = self.frame_lengths(sample_lengths)
        padding = torch.arange(frames, device=x.device).unsqueeze(0) >= lengths.unsqueeze(1)
        x = x + self.positional(x, padding)

        if self.extra_tokens is not None:
            x = torch.cat([self.extra_tokens.expand(x.size(0), -1, -1), x], dim=1)
            padding = F.pad(padding, (self.num_extra, 0))
        mask = torch.zeros(padding.shape, dtype=torch.float32, device=x.device)
        mask = mask.masked_fill(padding, float("-inf"))[:, None, None, :]  # B x 1 x 1 x N
        scales = None
        if self.has_alibi:
            bias = F.pad(self.alibi(frames, x.device), (self.num_extra, 0, self.num_extra, 0))
            if self.alibi_scale is not None:
                scales = self.alibi_scale.clamp_min(0).float()
                if not self.scale_per_layer:
                    bias, scales = bias * scales.squeeze(0), None
        else:
            bias = torch.zeros((), device=x.device)

        def layer_bias(index: int) -> torch.Tensor:
            return (bias if scales is None else bias * scales[index]) + mask

        prenet = self.prenet
        if prenet.norm is not None and not prenet.layer_norm_first:
            x = prenet.norm(x)
        for i, blk in enumerate(prenet.blocks):
            x = self.block(blk, x, layer_bias(i))
        if prenet.norm is not None and prenet.layer_norm_first:
            x = prenet.norm(x)
        for i, blk in enumerate(self.blocks):
            x = self.block(blk, x, layer_bias(self.prenet_depth + i))
        if self.norm is not None:
            x = self.norm(x)
        return x[:, self.num_extra:].float()
