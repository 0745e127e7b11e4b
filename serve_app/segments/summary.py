"""The answer of POST /v1/segments, from each segment's scores: one row per segment in start
order, and per speaker the duration-weighted mean of its segments' scores."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from serve_app.labels import emotion_fields
from serve_app.segments.spec import Span

# Segments with no speaker (found by VAD, or given without one) count under this name.
UNKNOWN_SPEAKER = "unknown"


def speaker_name(span: Span) -> str:
    return span.speaker if span.speaker is not None else UNKNOWN_SPEAKER


def segment_row(index: int, span: Span, labels: list[str], scores: list[float],
                embedding: np.ndarray | None = None) -> dict:
    """One segment of the answer: where it is, whose it is, and its emotion as predict
    gives it (emotion, label, confidence, scores by English name)."""
    row = {"index": index, "start_s": round(span.start_s, 6), "end_s": round(span.end_s, 6),
           "speaker": span.speaker}
    if span.channel is not None:
        row["channel"] = span.channel
    row.update(emotion_fields(labels, scores))
    if embedding is not None:
        row["embedding"] = np.asarray(embedding).tolist()
    return row


@dataclass
class SpeakerTally:
    """Running per-speaker sums, so that an NDJSON answer can stream rows and still end with
    the summary without keeping every row."""

    labels: list[str] | None = None
    _sums: dict[str, np.ndarray] = field(default_factory=dict)
    _seconds: dict[str, float] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)
    _first: dict[str, tuple[float, float]] = field(default_factory=dict)

    def add(self, span: Span, labels: list[str], scores: list[float]) -> None:
        if self.labels is None:
            self.labels = list(labels)
        elif list(labels) != self.labels:
            raise ValueError("segments scored with different label sets cannot be summed")
        name = speaker_name(span)
        weighted = np.asarray(scores, dtype=np.float64) * span.duration_s
        self._sums[name] = self._sums.get(name, 0.0) + weighted
        self._seconds[name] = self._seconds.get(name, 0.0) + span.duration_s
        self._counts[name] = self._counts.get(name, 0) + 1
        first = (span.start_s, span.end_s)
        self._first[name] = min(self._first.get(name, first), first)

    def summary(self) -> dict[str, dict]:
        """speaker -> segments, speech_s, and emotion, confidence, scores of the
        duration-weighted mean; speakers in the order they first spoke (whatever the order
        the segments were added in)."""
        speakers = {}
        for name in sorted(self._sums, key=self._first.__getitem__):
            total = self._sums[name]
            seconds = self._seconds[name]
            mean = (total / seconds).tolist()
            fields = emotion_fields(self.labels, mean)
            del fields["label"]
            speakers[name] = {"segments": self._counts[name], "speech_s": round(seconds, 3),
                              **fields}
        return speakers


def speakers(spans: list[Span], labels: list[str], scores: list[list[float]]) -> dict:
    """Per-speaker summary of scored segments (in answer order)."""
    tally = SpeakerTally()
    for span, span_scores in zip(spans, scores, strict=True):
        tally.add(span, labels, span_scores)
    return tally.summary()
