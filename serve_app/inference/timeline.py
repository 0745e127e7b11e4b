"""Emotion over time: the classifier head on frame features mean-pooled over sliding windows.

emotion2vec's encoder gives one feature vector per 20 ms (50 frames a second). The utterance
result pools all frames; a timeline pools the frames of each window [start, start + window)
with starts 0, hop, 2*hop, ..., and stops at the first window that reaches the last frame
(that window may be shorter: the last partial window is kept). A clip shorter than one window
gets one window over the whole clip. Each window goes through the same head, label mask and
float32 softmax as the utterance (serve_app/inference/heads.py), so a window over the whole clip
gives the utterance scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable

FRAME_RATE = 50.0  # frames per second: the encoder's conv stem has a stride of 320 samples


def window_bounds(n_frames: int, window_frames: int, hop_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame indices of each window, in order."""
    if n_frames < 1:
        return []
    if window_frames < 1 or hop_frames < 1:
        raise ValueError("window and hop must be at least one frame")
    bounds = []
    start = 0
    while start < n_frames:
        end = min(start + window_frames, n_frames)
        bounds.append((start, end))
        if end == n_frames:
            break  # this window reaches the end: later ones would only be shorter copies
        start += hop_frames
    return bounds


def to_frames(seconds: float) -> int:
    """Seconds to whole frames, halves rounded up (0.25 s -> 13 frames), at least one."""
    return max(1, math.floor(seconds * FRAME_RATE + 0.5))


def emotion_timeline(frames, score: Callable, window_s: float, hop_s: float) -> list[dict]:
    """Per window: start_s, end_s, the softmax scores and the raw logits of the clip's labels
    (as its utterance is scored: the label set's, head order).

    frames: float32 tensor (T, D); score: W x D pooled windows -> W (scores, logits) pairs.
    """
    import torch

    bounds = window_bounds(int(frames.shape[0]), to_frames(window_s), to_frames(hop_s))
    if not bounds:
        return []
    with torch.inference_mode():
        pooled = torch.stack([frames[start:end].float().mean(dim=0) for start, end in bounds])
        rows = score(pooled)
    return [{"start_s": round(start / FRAME_RATE, 3), "end_s": round(end / FRAME_RATE, 3),
             "scores": scores, "logits": logits}
            for (start, end), (scores, logits) in zip(bounds, rows)]
