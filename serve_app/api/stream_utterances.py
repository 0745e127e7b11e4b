"""`WS /v1/stream?segments=true`: an utterance event each time VAD closes an utterance, beside
the window events. The stream's session (serve_app/api/stream.py) hands in its samples as they
arrive and sends the events; this runs VAD on the open region (serve_app/segments/live.py:
which region, which utterances are over) through the VAD deployment, and scores each closed
utterance the way the session scores a window: its samples at the stream's rate, resampled as
a file of them would be, through the same variant call. So an utterance scores as predict on
a file of its samples.

One piece of work at a time (VAD on a region, then its utterances): while it runs, audio
keeps arriving and the next region simply grows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import numpy as np

from serve_app.api.stream_protocol import SampleBuffer, StreamError
from serve_app.audio.waveform import to_target_rate
from serve_app.config import SegmentSettings, VadSettings
from serve_app.errors import ApiError
from serve_app.labels import emotion_fields
from serve_app.segments.live import UtteranceTracker

if TYPE_CHECKING:
    from serve_app.api.vad_client import SpeechFinder
    from serve_app.wire import VariantAnswer

# (16 kHz waveform) -> VAD's spans, [start, end) at 16 kHz
FindSpeech = Callable[[np.ndarray], Awaitable[list[tuple[int, int]]]]
# (samples at the stream's rate) -> (labels, scores) as the session scores a window
Score = Callable[[np.ndarray], Awaitable[tuple[list[str], list[float]]]]


class LiveUtterances:
    def __init__(self, rate: int, vad: VadSettings, find: FindSpeech, score: Score):
        self.rate = rate
        self.tracker = UtteranceTracker(rate, vad)
        self.find = find
        self.score = score
        self.count = 0  # utterance events sent

    @classmethod
    def through(cls, finder: SpeechFinder, segments: SegmentSettings, rate: int, variant: str,
                predict: Callable[[np.ndarray], Awaitable[tuple[np.ndarray, VariantAnswer]]],
                ) -> LiveUtterances:
        """A stream's utterances: VAD through `finder` (its errors end the stream), each
        utterance scored by the session's `predict` (samples at the stream's rate)."""

        async def find(waveform: np.ndarray) -> list[tuple[int, int]]:
            try:
                spans, _ = await finder.find(waveform, segments.vad, segments.vad_timeout_s)
            except ApiError as exc:
                raise StreamError.from_api(exc) from None
            return spans

        async def score(samples: np.ndarray) -> tuple[list[str], list[float]]:
            _, answer = await predict(samples)
            finder.metrics.scored(variant, "stream")
            return answer.labels, answer.scores

        return cls(rate, segments.vad, find, score)

    def start(self, buffer: SampleBuffer, final: bool = False) -> asyncio.Task | None:
        """The work now due (VAD on the open region, then its closed utterances scored), as a
        task that returns their events; None when nothing is due."""
        region = self.tracker.due(len(buffer), final)
        if region is None:
            return None
        return asyncio.ensure_future(self._run(region, buffer.slice(*region), final))

    async def _run(self, region: tuple[int, int], samples: np.ndarray,
                   final: bool) -> list[dict]:
        waveform = await asyncio.to_thread(to_target_rate, samples, self.rate)
        spans = await self.find(waveform)
        events = []
        for utterance in self.tracker.found(region, spans, final):
            piece = samples[utterance.start - region[0]:utterance.end - region[0]]
            labels, scores = await self.score(piece)
            fields = emotion_fields(labels, scores)
            del fields["label"]
            events.append({"type": "utterance", "index": self.count,
                           "start_s": utterance.start_s, "end_s": utterance.end_s, **fields})
            self.count += 1
        return events
