"""`batch --by-segment`: a decoded recording's segments, found as POST /v1/segments finds them:
the turns of `NAME.rttm` beside `NAME.wav` when there is one (checked against the audio as the
route checks given segments), else the speech the VAD finds (the VAD deployment's own code,
with the Router's VAD settings). No Ray; silero-vad (torch) is imported on first use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serve_app.errors import ApiError
from serve_app.segments.spec import Span, parse_rttm, to_spans, too_many_found
from serve_app.tools.batch.plan import JobPlan

# An RTTM file beside a recording larger than this is refused unread (max_segments lines
# of a few dozen bytes each fit many times over).
MAX_RTTM_BYTES = 16 * 2**20


def rttm_beside(path: str | Path) -> Path:
    return Path(path).with_suffix(".rttm")


class SegmentFinder:
    """One per decode task: the VAD model is loaded once, when a recording first needs it."""

    def __init__(self, plan: JobPlan):
        self.plan = plan
        self._detector = None

    def spans(self, path: str, waveform: np.ndarray) -> list[Span]:
        """The segments to score, in start order; an ApiError (the route's code) when the
        RTTM file is bad or the VAD finds more than max_segments."""
        settings, limits = self.plan.segments, self.plan.limits
        rttm = rttm_beside(path)
        if rttm.is_file():
            if rttm.stat().st_size > MAX_RTTM_BYTES:
                raise ApiError(413, "rttm_too_large", f"{rttm.name} is larger than "
                               f"{MAX_RTTM_BYTES} bytes")
            specs = parse_rttm(rttm.read_text(encoding="utf-8", errors="replace"),
                               settings.max_segments, limits.min_duration_s)
            return to_spans(specs, len(waveform), limits.min_duration_s, limits.max_duration_s)
        if self._detector is None:
            from serve_app.inference.vad import SpeechDetector

            self._detector = SpeechDetector()
        found = self._detector.find(waveform, settings.vad).spans
        if len(found) > settings.max_segments:
            raise too_many_found(len(found), settings.max_segments)
        return [Span.found(start, end) for start, end in found]
