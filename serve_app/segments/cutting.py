"""Speech longer than max_segment_s, cut into pieces at its quietest point near the limit.

emotion2vec scores an utterance as a whole (its frames are mean-pooled), so a long monologue
is better cut where the speaker pauses or breathes than at a fixed length. Each piece is cut
at the quietest 32 ms (lowest mean square, on a 10 ms grid) between half the limit and the
limit from its start, never leaving a tail shorter than `min_samples`.
"""

from __future__ import annotations

import numpy as np

FRAME = 512  # 32 ms at 16 kHz: silero-vad's frame
HOP = 160    # 10 ms


def quietest_point(waveform: np.ndarray, low: int, high: int) -> int:
    """The sample at the centre of the quietest FRAME-long stretch that starts in
    [low - FRAME/2, high - FRAME/2] (clipped to the waveform): a cut point in [low, high]."""
    first = max(0, low - FRAME // 2)
    last = min(len(waveform) - FRAME, high - FRAME // 2)
    if last < first:
        return (low + high) // 2
    piece = waveform[first:last + FRAME].astype(np.float64)
    sums = np.concatenate([[0.0], np.cumsum(piece * piece)])
    starts = np.arange(0, last - first + 1, HOP)
    energy = sums[starts + FRAME] - sums[starts]
    best = int(starts[int(np.argmin(energy))])  # the first of equals: deterministic
    return min(high, max(low, first + best + FRAME // 2))


def cut_long(spans: list[tuple[int, int]], waveform: np.ndarray, max_samples: int,
             min_samples: int) -> list[tuple[int, int]]:
    """Every span longer than max_samples cut into pieces of at most max_samples, each cut
    at the quietest point between half the limit and the limit from the piece's start."""
    pieces: list[tuple[int, int]] = []
    for start, end in spans:
        while end - start > max_samples:
            high = min(start + max_samples, end - min_samples)
            if high <= start:  # no cut leaves min_samples after it: cut at the limit
                high = start + max_samples
            low = min(start + max(1, max_samples // 2), high)
            cut = max(start + 1, quietest_point(waveform, low, high))  # always advances
            pieces.append((start, cut))
            start = cut
        pieces.append((start, end))
    return pieces
