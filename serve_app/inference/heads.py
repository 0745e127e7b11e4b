"""The classifier head's logits -> scores for a label set (torch, no Ray).

FunASR masks a label by setting its logit to -inf before the softmax (the labels whose token
starts with "unuse"); a request's label set (serve_app/labels.py) masks every label outside it
the same way. Masking works on the logits the head already computed, so clips batched together
may each ask for their own label set.
"""

from __future__ import annotations

from collections.abc import Sequence


def masked_scores(logits, keeps: Sequence[Sequence[int]]) -> list[tuple[list[float], list[float]]]:
    """B x C logits and one label set (head indices, head order) per row -> per row, the float32
    softmax over its labels (the others at -inf) and its labels' raw float32 logits, both in
    head order: the masked labels are left out, never -inf."""
    import torch

    logits = logits.float()
    rows = []
    for row, keep in zip(logits, keeps, strict=True):
        index = torch.as_tensor(list(keep), dtype=torch.long, device=row.device)
        masked = torch.full_like(row, float("-inf"))
        masked[index] = row[index]
        scores = torch.softmax(masked, dim=-1)[index]
        rows.append((scores.tolist(), row[index].tolist()))
    return rows
