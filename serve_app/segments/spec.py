"""The segments a caller gives for a recording, as JSON or as RTTM, and their checks.

Checks run in two steps, both before any model call ("nothing half-done"): what the text
alone can tell (syntax, order of times, length, count, one file id) as soon as the request is
read, and what needs the audio (past its end) once it is decoded. Every refusal is a 422
`invalid_segments` naming the first bad segment: its position in the JSON list (`index`), or
its line in the RTTM file (`line`, from 1).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from serve_app.audio.waveform import TARGET_SR
from serve_app.errors import ApiError
from serve_app.untrusted import finite_float, load_json

# A given segment may end this far past the audio's end (rounding in the tool that wrote
# it); its samples stop at the end.
END_TOLERANCE_S = 0.5
# Given segments together cover at most this many times the recording (check_coverage).
MAX_COVERAGE = 2.0
MAX_SPEAKER_CHARS = 64
JSON_KEYS = ("start_s", "end_s", "speaker")
# RTTM: SPEAKER <file> <chan> <start> <duration> <NA> <NA> <speaker> <NA> <NA>
RTTM_MIN_FIELDS = 8
_SPEAKER = re.compile(rf"[^\x00-\x1f\x7f\ud800-\udfff]{{1,{MAX_SPEAKER_CHARS}}}")
_CHANNEL_SPEAKER = re.compile(r"ch([0-9]{1,3})")


class InvalidSegments(ApiError):
    """422 invalid_segments; `where` is {"index": i} or {"line": n}, or empty."""

    def __init__(self, message: str, **where: int):
        super().__init__(422, "invalid_segments", message, **where)


@dataclass(frozen=True)
class SegmentSpec:
    """One segment as given: times in seconds of the recording, and where it was given."""

    start_s: float
    end_s: float
    speaker: str | None
    where: dict  # {"index": i} (JSON) or {"line": n} (RTTM): for error messages

    @property
    def label(self) -> str:
        return (f"segment {self.where['index']}" if "index" in self.where
                else f"line {self.where['line']}")


@dataclass(frozen=True)
class Span:
    """A segment to score: samples [start, end) of the 16 kHz waveform (of `channel` when the
    channels are scored apart), and the times the answer reports."""

    start: int
    end: int
    start_s: float
    end_s: float
    speaker: str | None = None
    channel: int | None = None

    @property
    def duration_s(self) -> float:
        return (self.end - self.start) / TARGET_SR

    @classmethod
    def found(cls, start: int, end: int, speaker: str | None = None,
              channel: int | None = None) -> Span:
        """A span the VAD found: its times are its samples'."""
        return cls(start, end, round(start / TARGET_SR, 6), round(end / TARGET_SR, 6), speaker,
                   channel)


def _fail(spec: SegmentSpec, message: str) -> InvalidSegments:
    return InvalidSegments(f"{spec.label}: {message}", **spec.where)


def _check_times(spec: SegmentSpec, min_duration_s: float) -> SegmentSpec:
    """What the times alone tell: not before 0, not reversed, not too short."""
    if spec.start_s < 0:
        raise _fail(spec, f"starts before 0 ({spec.start_s:g} s)")
    if spec.end_s < spec.start_s:
        raise _fail(spec, f"is reversed: ends at {spec.end_s:g} s, before its start at "
                          f"{spec.start_s:g} s")
    if spec.end_s - spec.start_s < min_duration_s - 1e-9:
        raise _fail(spec, f"lasts {spec.end_s - spec.start_s:.3f} s; at least "
                          f"{min_duration_s:g} s are needed")
    return spec


def _number(value, name: str, where: dict) -> float:
    try:
        return finite_float(value, name)
    except ValueError:
        raise InvalidSegments(f"segment {where['index']}: {name} must be a finite number of "
                              f"seconds, not {str(value)[:40]}", **where) from None


def _speaker(value, label: str, where: dict) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SPEAKER.fullmatch(value.strip()):
        raise InvalidSegments(f"{label}: speaker must be a text of 1 to {MAX_SPEAKER_CHARS} "
                              f"printable characters, not {json.dumps(value)[:40]}", **where)
    return value.strip()


def _too_many(count_so_far: int, max_segments: int, **where: int) -> InvalidSegments:
    place = f"segment {where['index']}" if "index" in where else f"line {where['line']}"
    return InvalidSegments(f"more than {max_segments} segments (max_segments); {place} is "
                           f"the {count_so_far}th", **where)


def parse_json(text: str, max_segments: int, min_duration_s: float) -> list[SegmentSpec]:
    """`[{"start_s": 0.0, "end_s": 2.4, "speaker": "agent"}, ...]` (speaker optional)."""
    try:
        items = load_json(text)
    except ValueError as exc:
        raise InvalidSegments(f"segments: {exc}") from None
    if not isinstance(items, list):
        raise InvalidSegments('segments must be a JSON list of {"start_s", "end_s", '
                              '"speaker"} objects')
    specs = []
    for index, item in enumerate(items):
        where = {"index": index}
        if index >= max_segments:
            raise _too_many(index + 1, max_segments, **where)
        if not isinstance(item, dict):
            raise InvalidSegments(f"segment {index}: must be an object with start_s and end_s",
                                  **where)
        unknown = sorted(set(item) - set(JSON_KEYS))
        if unknown:
            raise InvalidSegments(f"segment {index}: unknown keys {unknown}; expected "
                                  f"{list(JSON_KEYS)}", **where)
        missing = [key for key in ("start_s", "end_s") if key not in item]
        if missing:
            raise InvalidSegments(f"segment {index}: {' and '.join(missing)} missing", **where)
        spec = SegmentSpec(_number(item["start_s"], "start_s", where),
                           _number(item["end_s"], "end_s", where),
                           _speaker(item.get("speaker"), f"segment {index}", where), where)
        specs.append(_check_times(spec, min_duration_s))
    if not specs:
        raise InvalidSegments("segments is an empty list: give at least one segment, or "
                              "leave it out to let the service find the speech")
    return specs


def parse_rttm(text: str, max_segments: int, min_duration_s: float) -> list[SegmentSpec]:
    """SPEAKER lines of an RTTM file (one turn each); other line types are ignored. All its
    SPEAKER lines must name the same file id."""
    specs, file_id = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0] != "SPEAKER":
            continue  # blank lines, ;; comments, SPKR-INFO and other types
        where = {"line": number}
        if len(specs) >= max_segments:
            raise _too_many(len(specs) + 1, max_segments, **where)
        if len(fields) < RTTM_MIN_FIELDS:
            raise InvalidSegments(f"line {number}: a SPEAKER line has at least "
                                  f"{RTTM_MIN_FIELDS} fields (SPEAKER <file> <chan> <start> "
                                  f"<duration> <NA> <NA> <speaker> ...); this one has "
                                  f"{len(fields)}", **where)
        if file_id is None:
            file_id = fields[1]
        elif fields[1] != file_id:
            raise InvalidSegments(f"line {number}: file id {fields[1][:64]!r}, but the lines "
                                  f"before name {file_id[:64]!r}; send one recording's RTTM",
                                  **where)
        try:
            start, duration = float(fields[3]), float(fields[4])
        except ValueError:
            start = duration = math.nan
        if not (math.isfinite(start) and math.isfinite(duration)):
            raise InvalidSegments(f"line {number}: start {fields[3][:20]!r} and duration "
                                  f"{fields[4][:20]!r} must be numbers of seconds", **where)
        speaker = _speaker(fields[7], f"line {number}", where)
        spec = SegmentSpec(start, round(start + duration, 6), speaker, where)
        specs.append(_check_times(spec, min_duration_s))
    if not specs:
        raise InvalidSegments("the RTTM file has no SPEAKER lines")
    return specs


def too_many_found(count: int, max_segments: int) -> ApiError:
    return ApiError(413, "too_many_segments", f"the VAD found {count} segments; the limit is "
                    f"{max_segments} (max_segments): send a shorter recording, or its segments")


def channel_of(spec: SegmentSpec, channels: int) -> int:
    """channels=split: a given segment's speaker names its channel, ch0, ch1, ..."""
    match = _CHANNEL_SPEAKER.fullmatch(spec.speaker or "")
    if match is None or int(match.group(1)) >= channels:
        names = ", ".join(f"ch{c}" for c in range(channels))
        raise _fail(spec, f"with channels=split, speaker must name a channel ({names}), "
                          f"not {spec.speaker!r}")
    return int(match.group(1))


def to_spans(specs: list[SegmentSpec], samples: int, min_duration_s: float,
             max_duration_s: float, channels: int | None = None) -> list[Span]:
    """The given segments against a decoded recording of `samples` samples at 16 kHz: each
    within it (ending at most END_TOLERANCE_S past its end, cut there) and no longer than
    predict takes (max_duration_s), in start order (ties: end). `channels`: the
    recording's channel count when they are scored apart."""
    duration_s = samples / TARGET_SR
    min_samples = round(min_duration_s * TARGET_SR)
    spans = []
    for spec in specs:
        if spec.end_s > duration_s + END_TOLERANCE_S:
            raise _fail(spec, f"ends at {spec.end_s:g} s, more than {END_TOLERANCE_S:g} s past "
                              f"the end of the audio ({duration_s:.3f} s)")
        start = round(spec.start_s * TARGET_SR)
        end = min(round(spec.end_s * TARGET_SR), samples)
        if end - start < min_samples:
            raise _fail(spec, f"has {max(0, end - start) / TARGET_SR:.3f} s of audio before "
                              f"the recording ends at {duration_s:.3f} s; at least "
                              f"{min_duration_s:g} s are needed")
        if end - start > max_duration_s * TARGET_SR:
            raise _fail(spec, f"lasts {(end - start) / TARGET_SR:.1f} s; a segment is scored "
                              f"as one clip, at most {max_duration_s:g} s (max_duration_s)")
        channel = channel_of(spec, channels) if channels is not None else None
        spans.append(Span(start, end, spec.start_s, min(spec.end_s, round(duration_s, 6)),
                          spec.speaker, channel))
    return in_order(spans)


def check_coverage(spans: list[Span], samples: int, channels: int) -> None:
    """Given segments may overlap (two speakers at once), but not without bound: together
    they cover at most MAX_COVERAGE times the audio scored (its duration times the channels
    scored apart). Real diarization overlaps far less; repeating a span is no analysis."""
    covered = sum(span.end - span.start for span in spans)
    if covered > MAX_COVERAGE * samples * channels:
        raise InvalidSegments(
            f"the segments cover {covered / TARGET_SR:.1f} s of a recording of "
            f"{samples * channels / TARGET_SR:.1f} s: more than {MAX_COVERAGE:g} times it "
            "(overlapping or repeated segments)")


def scored_seconds(spans: list[Span]) -> float:
    return sum(span.duration_s for span in spans)


def in_order(spans: list[Span]) -> list[Span]:
    """Start order, ties by end (then as given: the sort is stable)."""
    return sorted(spans, key=lambda span: (span.start_s, span.end_s))
