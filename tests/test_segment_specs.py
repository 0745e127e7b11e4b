"""POST /v1/segments' pieces without Ray: given segments (JSON, RTTM) and every way they are
refused, long speech cut at its quietest point, the per-speaker summary, the settings."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from pydantic import ValidationError

from serve_app.audio.waveform import Limits
from serve_app.config import RouterSettings, SegmentSettings, VadSettings
from serve_app.segments.cutting import cut_long, quietest_point
from serve_app.segments.spec import (
    InvalidSegments,
    Span,
    parse_json,
    parse_rttm,
    to_spans,
)
from serve_app.segments.summary import SpeakerTally, segment_row, speakers

MIN_S = 0.1
LABELS = ["生气/angry", "开心/happy", "中立/neutral"]


def refused(call, *args) -> InvalidSegments:
    with pytest.raises(InvalidSegments) as caught:
        call(*args)
    error = caught.value
    assert error.status == 422 and error.code == "invalid_segments"
    return error


# -- JSON -------------------------------------------------------------------------------
def test_json_segments_parse_with_and_without_speakers():
    specs = parse_json(json.dumps([{"start_s": 0, "end_s": 2.4, "speaker": " agent "},
                                   {"start_s": 1.5, "end_s": 3.0}]), 10, MIN_S)
    assert [(s.start_s, s.end_s, s.speaker) for s in specs] == [(0.0, 2.4, "agent"),
                                                                (1.5, 3.0, None)]


@pytest.mark.parametrize("segments, index, words", [
    ("[{\"start_s\": 0, ", None, "not valid JSON"),
    ('{"start_s": 0, "end_s": 1}', None, "JSON list"),
    ("[]", None, "empty list"),
    ('[{"start_s": 0, "end_s": 1}, 3]', 1, "must be an object"),
    ('[{"start_s": 0, "end_s": 1, "mood": "x"}]', 0, "unknown keys ['mood']"),
    ('[{"start_s": 0}]', 0, "end_s missing"),
    ('[{"start_s": "0", "end_s": 1}]', 0, "finite number"),
    ('[{"start_s": true, "end_s": 1}]', 0, "finite number"),
    ('[{"start_s": 0, "end_s": NaN}]', 0, "finite number"),
    ('[{"start_s": 0, "end_s": 1}, {"start_s": -0.5, "end_s": 1}]', 1, "starts before 0"),
    ('[{"start_s": 2, "end_s": 1}]', 0, "reversed"),
    ('[{"start_s": 1, "end_s": 1.05}]', 0, "at least 0.1 s"),
    ('[{"start_s": 0, "end_s": 1, "speaker": ""}]', 0, "speaker must be"),
    ('[{"start_s": 0, "end_s": 1, "speaker": 7}]', 0, "speaker must be"),
    ('[{"start_s": 0, "end_s": 1, "speaker": "a\\nb"}]', 0, "speaker must be"),
])
def test_json_refusals_name_the_first_bad_segment(segments, index, words):
    error = refused(parse_json, segments, 10, MIN_S)
    assert words in error.message
    assert error.details.get("index") == index
    assert error.body()["error"]["code"] == "invalid_segments"


def test_json_over_max_segments():
    items = [{"start_s": i, "end_s": i + 0.5} for i in range(4)]
    error = refused(parse_json, json.dumps(items), 3, MIN_S)
    assert error.details == {"index": 3} and "more than 3 segments" in error.message
    assert len(parse_json(json.dumps(items), 4, MIN_S)) == 4


# -- RTTM -------------------------------------------------------------------------------
RTTM = """;; written by a diarization tool
SPKR-INFO call 1 <NA> <NA> <NA> unknown agent <NA> <NA>
SPEAKER call 1 0.500 2.000 <NA> <NA> agent <NA> <NA>

SPEAKER call 1 2.300 1.700 <NA> <NA> customer <NA> <NA>
SPEAKER call 1 3.900 0.600 <NA> <NA> agent <NA> <NA>
"""


def test_rttm_speaker_lines_become_segments():
    specs = parse_rttm(RTTM, 10, MIN_S)
    assert [(s.start_s, s.end_s, s.speaker, s.where["line"]) for s in specs] == [
        (0.5, 2.5, "agent", 3), (2.3, 4.0, "customer", 5), (3.9, 4.5, "agent", 6)]


@pytest.mark.parametrize("text, line, words", [
    ("SPEAKER call 1 0.5 2.0 <NA> <NA> agent\nSPEAKER other 1 3 1 <NA> <NA> b <NA> <NA>\n",
     2, "file id 'other'"),
    ("SPEAKER call 1 0.5 <NA>\n", 1, "at least 8 fields"),
    ("SPEAKER call 1 zero 2.0 <NA> <NA> agent <NA> <NA>\n", 1, "must be numbers"),
    ("SPEAKER call 1 0.5 inf <NA> <NA> agent <NA> <NA>\n", 1, "must be numbers"),
    ("SPEAKER call 1 0.5 1 <NA> <NA> a <NA> <NA>\nSPEAKER call 1 -1 2 <NA> <NA> a <NA> <NA>\n",
     2, "starts before 0"),
    ("SPEAKER call 1 3 -1 <NA> <NA> agent <NA> <NA>\n", 1, "reversed"),
    ("SPEAKER call 1 3 0.05 <NA> <NA> agent <NA> <NA>\n", 1, "at least 0.1 s"),
    (";; nothing\nSPKR-INFO call 1 <NA> <NA> <NA> unknown agent <NA> <NA>\n", None,
     "no SPEAKER lines"),
])
def test_rttm_refusals_name_the_line(text, line, words):
    error = refused(parse_rttm, text, 10, MIN_S)
    assert words in error.message
    assert error.details.get("line") == line


def test_rttm_over_max_segments_names_the_line():
    error = refused(parse_rttm, RTTM, 2, MIN_S)
    assert error.details == {"line": 6} and "more than 2 segments" in error.message


# -- against the decoded audio ----------------------------------------------------------
def test_spans_are_in_start_order_with_overlaps_and_end_tolerance():
    specs = parse_json(json.dumps([
        {"start_s": 2.0, "end_s": 4.2, "speaker": "b"},   # past the end by 0.2 s: cut there
        {"start_s": 0.0, "end_s": 2.5, "speaker": "a"},
        {"start_s": 0.0, "end_s": 1.0},                    # same start: the shorter first
        {"start_s": 1.0, "end_s": 3.0, "speaker": "a"},   # overlaps both
    ]), 10, MIN_S)
    spans = to_spans(specs, samples=4 * 16_000, min_duration_s=MIN_S, max_duration_s=60)
    assert [(s.start, s.end, s.speaker) for s in spans] == [
        (0, 16_000, None), (0, 40_000, "a"), (16_000, 48_000, "a"), (32_000, 64_000, "b")]
    assert spans[-1].end_s == 4.0 and spans[-1].start_s == 2.0
    # round(start_s * 16000): the samples predict would be given
    odd = to_spans(parse_json('[{"start_s": 0.00003, "end_s": 0.20003}]', 1, MIN_S),
                   16_000, MIN_S, 60)
    assert (odd[0].start, odd[0].end) == (0, 3200)


@pytest.mark.parametrize("segments, words", [
    ('[{"start_s": 0, "end_s": 1}, {"start_s": 3, "end_s": 4.6}]', "more than 0.5 s past"),
    ('[{"start_s": 0, "end_s": 1}, {"start_s": 3.95, "end_s": 4.3}]', "0.050 s of audio"),
    ('[{"start_s": 0, "end_s": 1}, {"start_s": 4.1, "end_s": 4.4}]', "0.000 s of audio"),
    ('[{"start_s": 0, "end_s": 1}, {"start_s": 0, "end_s": 3.5}]', "at most 3 s"),
])
def test_spans_past_the_end_or_too_long_are_refused(segments, words):
    error = refused(to_spans, parse_json(segments, 10, MIN_S), 4 * 16_000, MIN_S, 3.0)
    assert words in error.message and error.details == {"index": 1}


def test_split_channels_take_their_channel_from_the_speaker():
    specs = parse_rttm("SPEAKER c 1 0 1 <NA> <NA> ch1 <NA> <NA>\n"
                       "SPEAKER c 1 1 1 <NA> <NA> ch0 <NA> <NA>\n", 10, MIN_S)
    spans = to_spans(specs, 32_000, MIN_S, 60, channels=2)
    assert [(s.channel, s.speaker) for s in spans] == [(1, "ch1"), (0, "ch0")]
    bad = parse_rttm("SPEAKER c 1 0 1 <NA> <NA> ch2 <NA> <NA>\n", 10, MIN_S)
    error = refused(to_spans, bad, 32_000, MIN_S, 60, 2)
    assert "ch0, ch1" in error.message and error.details == {"line": 1}


# -- cutting long speech ----------------------------------------------------------------
def test_long_speech_is_cut_at_its_quietest_point():
    rng = np.random.default_rng(0)
    wave = (rng.standard_normal(40 * 16_000) * 0.3).astype(np.float32)
    for pause_s in (7.0, 16.3, 30.0):  # quiet stretches of 80 ms
        at = int(pause_s * 16_000)
        wave[at - 640:at + 640] *= 0.01
    pieces = cut_long([(0, len(wave))], wave, max_samples=10 * 16_000, min_samples=4000)
    cuts = [end / 16_000 for _, end in pieces[:-1]]
    # Each cut lies in 5-10 s from its piece's start: 7.0 is taken first, then 16.3; 30.0
    # may be out of reach, depending on where the noise alone is quietest.
    assert all(b - a <= 10 * 16_000 for a, b in pieces)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(wave)
    assert all(p[1] == q[0] for p, q in itertools.pairwise(pieces))
    assert abs(cuts[0] - 7.0) < 0.03 and abs(cuts[1] - 16.3) < 0.03
    # within [low, high] whatever the signal
    assert quietest_point(wave, 1000, 1000) == 1000
    short = cut_long([(0, 10 * 16_000 + 100)], wave, 10 * 16_000, 4000)
    assert short[-1][1] - short[-1][0] >= 4000


# -- the summary ------------------------------------------------------------------------
def test_speakers_are_duration_weighted_in_first_spoken_order():
    spans = [Span(0, 16_000, 0.0, 1.0, "b"), Span(16_000, 64_000, 1.0, 4.0, "a"),
             Span(64_000, 96_000, 4.0, 6.0, None), Span(96_000, 112_000, 6.0, 7.0, "a")]
    scores = [[0.1, 0.8, 0.1], [0.6, 0.2, 0.2], [0.2, 0.2, 0.6], [0.0, 1.0, 0.0]]
    summary = speakers(spans, LABELS, scores)
    assert list(summary) == ["b", "a", "unknown"]
    a = summary["a"]
    assert a["segments"] == 2 and a["speech_s"] == 4.0
    assert a["scores"]["angry"] == pytest.approx((0.6 * 3 + 0.0) / 4)
    assert a["scores"]["happy"] == pytest.approx((0.2 * 3 + 1.0) / 4)
    assert a["emotion"] == "angry" and a["confidence"] == pytest.approx(0.45)
    assert summary["unknown"]["emotion"] == "neutral"
    tally = SpeakerTally()  # rows that finish out of order give the same summary
    for span, row in reversed(list(zip(spans, scores))):
        tally.add(span, LABELS, row)
    assert tally.summary() == summary
    row = segment_row(3, spans[3], LABELS, scores[3], np.ones(2, np.float32))
    assert row == {"index": 3, "start_s": 6.0, "end_s": 7.0, "speaker": "a",
                   "emotion": "happy", "label": "开心/happy", "confidence": 1.0,
                   "scores": {"angry": 0.0, "happy": 1.0, "neutral": 0.0},
                   "embedding": [1.0, 1.0]}


# -- settings ---------------------------------------------------------------------------
def test_segment_settings_defaults_and_bounds():
    settings = RouterSettings().segments
    assert settings.max_recording_s == 1800 and settings.max_segments == 2000
    assert settings.vad == VadSettings()
    limits = settings.decode_limits(Limits(120, 0.1, 256 * 2**20, 10.0))
    # a 30-minute 48 kHz stereo recording decodes within the caps
    assert limits.max_decoded_bytes >= 1800 * 48_000 * 2 * 4
    assert limits.max_duration_s == 1800 and limits.max_decode_s >= 10.0
    assert limits.min_duration_s == 0.1
    small = SegmentSettings(max_recording_s=60).decode_limits(Limits(120, 0.2, 256 * 2**20, 10))
    assert small == Limits(60, 0.2, 256 * 2**20, 10.0)
    with pytest.raises(ValidationError):
        VadSettings(threshold=1.5)
    with pytest.raises(ValidationError):
        RouterSettings(segments={"vad": {"min_speech_s": 0.01}})
    with pytest.raises(ValidationError):
        RouterSettings(segments={"max_segment": 3})  # unknown fields are refused


# -- scoring with a bound on segments in flight -----------------------------------------
def test_segments_in_flight_are_bounded_and_failures_cancel_the_rest():
    import asyncio
    import time

    from serve_app.errors import ApiError
    from serve_app.segments.runner import RecordingSlots, score_all

    spans = [Span(i * 1000, i * 1000 + 800, i / 16, i / 16 + 0.05) for i in range(12)]
    running, peak, cancelled = set(), [0], []

    async def score(span):
        running.add(span.start)
        peak[0] = max(peak[0], len(running))
        try:
            await asyncio.sleep(0.01 * (span.start // 1000 % 3))
            if span.start == 7000 and fail:
                raise ApiError(504, "model_timeout", "slow")
            if span.start > 7000 and fail:
                await asyncio.sleep(30)  # still running when segment 7 fails
            return span.end - span.start
        except asyncio.CancelledError:
            cancelled.append(span.start)
            raise
        finally:
            running.discard(span.start)

    async def collect():
        return [item async for item in score_all(spans, score, in_flight=3)]

    fail = False
    results = asyncio.run(collect())
    assert sorted(index for index, _ in results) == list(range(12))
    assert all(value == 800 for _, value in results) and peak[0] == 3
    fail = True
    started = time.monotonic()
    with pytest.raises(ApiError, match="slow"):
        asyncio.run(collect())
    assert time.monotonic() - started < 10  # the slow ones were cancelled, not waited for
    assert cancelled and not running  # nothing left running after the failure
    slots = RecordingSlots()
    with slots.hold(1):
        with pytest.raises(ApiError) as busy, slots.hold(1):
            pass
        assert busy.value.status == 503 and busy.value.headers["Retry-After"] == "5"
    assert slots.active == 0


# -- decoding with the channels kept apart (channels=split) -----------------------------
def test_kept_channels_equal_each_channel_decoded_alone():
    import io

    import soundfile

    from serve_app.audio import sndfile

    rng = np.random.default_rng(0)
    stereo = (rng.standard_normal((44_100 * 2, 2)) * 0.1).astype(np.float32)

    def flac(samples) -> bytes:
        buffer = io.BytesIO()
        soundfile.write(buffer, samples, 44_100, format="FLAC")
        return buffer.getvalue()

    both = sndfile.decode(flac(stereo), max_duration_s=10, min_duration_s=0.1,
                          keep_channels=True)
    mixed = sndfile.decode(flac(stereo), max_duration_s=10, min_duration_s=0.1)
    assert np.array_equal(both.waveform, mixed.waveform) and mixed.channel_waveforms is None
    assert both.channel_waveforms.shape == (2, len(both.waveform))
    for channel in (0, 1):
        alone = sndfile.decode(flac(stereo[:, channel]), max_duration_s=10, min_duration_s=0.1)
        assert np.array_equal(both.channel_waveforms[channel], alone.waveform)
