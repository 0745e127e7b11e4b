"""Padded batches of gathered requests: like lengths pad together, each pass bounded."""

import random

from serve_app.inference.passes import padded_chunks


def padded(lengths, chunk):
    return len(chunk) * max(lengths[i] for i in chunk)


def test_a_long_clip_does_not_pad_the_short_ones():
    lengths = [30, 2, 2, 2, 2]
    # Summed lengths (38) would fit 40 in one pass that pads to 5 x 30 = 150.
    assert padded_chunks(lengths, 40) == [[1, 2, 3, 4], [0]]


def test_equal_clips_fill_each_pass():
    assert [len(c) for c in padded_chunks([5] * 20, 80)] == [16, 4]


def test_a_clip_over_the_bound_runs_alone():
    assert padded_chunks([200, 10], 100) == [[1], [0]]


def test_nothing_gathered():
    assert padded_chunks([], 100) == []


def test_every_clip_once_and_every_pass_within_bound():
    rng = random.Random(7)
    for _ in range(200):
        lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 40))]
        bound = rng.randint(20, 400)
        chunks = padded_chunks(lengths, bound)
        assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
        for chunk in chunks:
            assert len(chunk) == 1 or padded(lengths, chunk) <= bound


def test_at_most_max_clips_per_pass_shortest_first():
    lengths = [9, 1, 8, 2, 7, 3, 6]
    chunks = padded_chunks(lengths, 1000, max_clips=3)
    assert chunks == [[1, 3, 5], [6, 4, 2], [0]]
