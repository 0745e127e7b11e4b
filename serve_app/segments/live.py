"""Utterances in a live stream (`WS /v1/stream?segments=true`): which audio to run VAD on
next, and which of the speech it found is over (an utterance event is due).

VAD runs on the open region only: from the end of the last utterance reported (or from a
little before speech that has not ended yet) to the newest sample; silence is skipped over,
so the region stays about max_segment_s + min_silence_s long however long the stream runs.
A span VAD ends before the region's end is over: silero closed it after min_silence_s of
silence, or cut it at max_segment_s (serve_app/segments/cutting.py); silero's probabilities
are causal, so more audio would not move it. A span that runs to the region's end is still
open. At the end of the stream, whatever speech is open is over too.

Sample positions here are at the stream's own rate; VAD's spans come at 16 kHz, relative to
the region's start.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.audio.waveform import TARGET_SR
from serve_app.config import VadSettings

# Audio kept before open speech when the region moves up to it: silero's recurrent state
# starts afresh at the region's start and needs a few frames of context.
LEAD_S = 0.25
# New audio between two VAD runs.
RUN_EVERY_S = 0.5


@dataclass(frozen=True)
class Utterance:
    start: int  # [start, end) at the stream's rate
    end: int
    start_s: float
    end_s: float


class UtteranceTracker:
    def __init__(self, rate: int, settings: VadSettings):
        self.rate = rate
        self.settings = settings
        self.committed = 0   # nothing before this is looked at again
        self.last_run = 0    # samples buffered when VAD last ran
        self.reported = 0

    def due(self, buffered: int, final: bool = False) -> tuple[int, int] | None:
        """The region to run VAD on now, or None: after RUN_EVERY_S of new audio, or at the
        end of the stream when anything is left."""
        if buffered <= self.committed:
            return None
        if final or buffered - self.last_run >= RUN_EVERY_S * self.rate:
            return self.committed, buffered
        return None

    def found(self, region: tuple[int, int], spans: list[tuple[int, int]],
              final: bool = False) -> list[Utterance]:
        """VAD's spans (16 kHz, from the region's start) for `region`: the utterances now
        over, in order; the region moves on past them."""
        start, end = region
        self.last_run = end
        length16 = round((end - start) * TARGET_SR / self.rate)
        closed, open_start = [], None
        for span_start, span_end in spans:
            a = start + round(span_start * self.rate / TARGET_SR)
            b = min(end, start + round(span_end * self.rate / TARGET_SR))
            if span_end >= length16 and not final:
                open_start = a
                break
            if b > a:
                closed.append(Utterance(a, b, round(a / self.rate, 6), round(b / self.rate, 6)))
        if closed:
            self.committed = closed[-1].end
        if open_start is not None:
            self.committed = max(self.committed, open_start - round(LEAD_S * self.rate))
        elif final:
            self.committed = end
        elif not closed:
            # Silence so far: keep only what could still be the start of speech.
            vad = self.settings
            keep = round((vad.min_speech_s + vad.pad_s + LEAD_S) * self.rate)
            self.committed = max(self.committed, end - keep)
        self.reported += len(closed)
        return closed
