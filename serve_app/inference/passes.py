"""How the requests a variant gathered are split into padded forward passes.

A padded batch costs, in time and in memory, its number of clips times its longest clip, not
the sum of their lengths: one 30 s clip among fifteen 2 s ones makes 480 s of work out of 60 s.
Clips are therefore taken shortest first, so that like lengths pad together, and each pass is
held to `max_padded` samples (clips x longest), and to `max_clips` clips when given (a batch
job gathers more clips than one pass may hold). A clip longer than that runs alone.
"""

from __future__ import annotations


def padded_chunks(lengths: list[int], max_padded: int,
                  max_clips: int | None = None) -> list[list[int]]:
    """Indices into `lengths`, grouped into passes of at most `max_padded` padded samples
    (and at most `max_clips` clips)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Shortest first: the clip being added is the longest of its chunk.
        if current and ((len(current) + 1) * lengths[index] > max_padded
                        or len(current) == max_clips):
            chunks.append(current)
            current = []
        current.append(index)
    return [*chunks, current] if current else chunks
