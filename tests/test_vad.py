"""silero-vad on conversations made by the test (tests/conversation.py): two espeak-ng voices
with known turn times, known silences and noise under them.

Tolerances. A VAD span may start up to pad_s (0.1 s) plus two of silero's 32 ms frames
before a turn's first sample (its padding, and a frame that straddles the onset), and may
end up to pad_s plus 8 frames (0.36 s) after the turn's last sample: silero's speech ends when
the probability falls below threshold - 0.15, which lags the last voiced sound (measured
here: 0.04-0.25 s). A span must not start more than 0.1 s inside a turn, nor end more than
0.1 s before its end (soft onsets and endings: a fricative under the noise).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from serve_app.config import VadSettings
from tests import conversation
from tests.clips import espeak_available

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

FRAME_S = 512 / 16_000
EARLY_S = 0.1 + 2 * FRAME_S
LATE_S = 0.1 + 8 * FRAME_S
INSIDE_S = 0.1


@pytest.fixture(scope="module")
def detector():
    from serve_app.inference.vad import SpeechDetector

    return SpeechDetector()


@pytest.fixture(scope="module")
def call():
    return conversation.make()


def seconds(spans):
    return [(start / 16_000, end / 16_000) for start, end in spans]


def assert_spans_match(spans, turns):
    """One span per turn, each within the tolerances of its turn."""
    assert len(spans) == len(turns), (spans, turns)
    for (start, end), turn in zip(spans, turns):
        assert turn.start_s - EARLY_S <= start <= turn.start_s + INSIDE_S, (start, turn)
        assert turn.end_s - INSIDE_S <= end <= turn.end_s + LATE_S, (end, turn)


def test_vad_finds_each_turn_of_a_noisy_two_voice_call(detector, call):
    found = detector.find(call.mono, VadSettings())
    spans = seconds(found.spans)
    assert_spans_match(spans, call.turns)
    # no span in pure silence: every span overlaps a turn (implied above), and spans are in
    # order without overlaps
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert found.vad_ms > 0


def test_vad_per_channel_finds_only_that_speaker(detector, call):
    for channel, speaker in ((call.left, "agent"), (call.right, "customer")):
        spans = seconds(detector.find(channel, VadSettings()).spans)
        assert_spans_match(spans, [t for t in call.turns if t.speaker == speaker])


def test_sequence_model_matches_silero_frame_by_frame(detector, call):
    """The sequence export (one onnxruntime call per 16 s) gives silero's frame-by-frame
    probabilities."""
    import torch
    from silero_vad import load_silero_vad

    piece = call.mono[:6 * 16_000]
    stock = load_silero_vad(onnx=True).audio_forward(torch.from_numpy(piece), 16_000)
    ours = detector.probabilities(piece)
    assert ours.shape == (stock.shape[1],)
    assert np.abs(ours - stock.numpy()[0]).max() < 1e-4


def test_long_speech_is_cut_into_pieces_at_the_limit(detector, call):
    """With max_segment_s under a turn's length, each turn comes back in pieces no longer
    than the limit, cut inside it, and together they still cover it."""
    settings = VadSettings(max_segment_s=1.5)
    spans = seconds(detector.find(call.mono, settings).spans)
    assert all(end - start <= 1.5 + 1e-6 for start, end in spans)
    for turn in call.turns:
        pieces = [s for s in spans if s[1] > turn.start_s and s[0] < turn.end_s]
        assert len(pieces) >= int((turn.end_s - turn.start_s) / 1.5)
        assert pieces[0][0] <= turn.start_s + INSIDE_S and pieces[-1][1] >= turn.end_s - INSIDE_S
        assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))  # cut, nothing lost


def test_silence_and_noise_alone_have_no_speech(detector):
    noise = (np.random.default_rng(1).standard_normal(5 * 16_000) * 0.004).astype(np.float32)
    assert detector.find(noise, VadSettings()).spans == []
    assert detector.find(np.zeros(0, np.float32), VadSettings()).spans == []


def run_live(detector, samples, rate, settings, chunk_s=0.1):
    """A stream fed in chunks; VAD on each due region, as the stream runs it."""
    from serve_app.audio.waveform import to_target_rate
    from serve_app.segments.live import UtteranceTracker

    tracker = UtteranceTracker(rate, settings)
    utterances, longest, chunk = [], 0, int(chunk_s * rate)
    for buffered in [*range(chunk, len(samples), chunk), len(samples)]:
        final = buffered == len(samples)
        region = tracker.due(buffered, final)
        if region is None:
            continue
        longest = max(longest, region[1] - region[0])
        spans = detector.find(to_target_rate(samples[region[0]:region[1]], rate), settings)
        utterances += tracker.found(region, spans.spans, final)
    return utterances, longest / rate


@pytest.mark.parametrize("rate", [16_000, 44_100])
def test_live_utterances_close_as_the_turns_end(detector, call, rate):
    samples = call.mono if rate == 16_000 else _resampled(call.mono, rate)
    utterances, longest_s = run_live(detector, samples, rate, VadSettings())
    spans = [(u.start_s, u.end_s) for u in utterances]
    assert_spans_match(spans, call.turns)
    assert all(u.start_s == round(u.start / rate, 6) for u in utterances)
    # the region VAD runs on stays short: a turn plus the silences around it
    assert longest_s < max(t.end_s - t.start_s for t in call.turns) + 2.5


def test_live_long_speech_is_reported_in_pieces_while_it_goes_on(detector, call):
    settings = VadSettings(max_segment_s=1.5)
    utterances, longest_s = run_live(detector, call.mono, 16_000, settings)
    assert all(u.end_s - u.start_s <= 1.5 + 1e-6 for u in utterances)
    for turn in call.turns:
        pieces = [u for u in utterances if u.end_s > turn.start_s and u.start_s < turn.end_s]
        assert len(pieces) >= int((turn.end_s - turn.start_s) / 1.5)
    assert longest_s < 1.5 + 2.5


def _resampled(samples, rate):
    import soxr

    return soxr.resample(samples, 16_000, rate).astype(np.float32)
