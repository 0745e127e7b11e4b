"""`WS /v1/stream?vad=true`: before a window is scored, the VAD deployment (the one
POST /v1/segments and `segments=true` use, serve_app/api/vad_client.py) looks at the window's
16 kHz waveform; a window where it finds no speech costs no model time: its event says
`"speech": false` and carries no emotion. Windows with speech are scored exactly as without
vad=true (the same waveform goes to the same variant call), and their events say
`"speech": true`. Also the one check, at connect, that what the stream asks of the VAD exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from serve_app.api.stream_protocol import POLICY, StreamError, StreamParams, Window
from serve_app.errors import ApiError

if TYPE_CHECKING:
    from serve_app.api.vad_client import SpeechFinder
    from serve_app.config import SegmentSettings
    from serve_app.metrics import StreamMetrics


def vad_refusal(params: StreamParams, finder: SpeechFinder | None) -> StreamError | None:
    """The error for a stream that asks for VAD (segments=true, vad=true) where this
    application has no VAD deployment; None when nothing is missing."""
    asked = [name for name, on in (("segments", params.segments), ("vad", params.vad)) if on]
    if not asked or (finder is not None and finder.handle is not None):
        return None
    return StreamError(POLICY, "vad_not_deployed", " and ".join(f"{name}=true" for name in asked)
                       + " needs the VAD deployment, which this application does not have")


class SpeechGate:
    """Whether a window holds speech, through the VAD deployment; counts the silent ones."""

    def __init__(self, finder: SpeechFinder, segments: SegmentSettings, metrics: StreamMetrics,
                 variant: str):
        self.finder, self.segments = finder, segments
        self.metrics, self.variant = metrics, variant
        self.silent = 0  # windows sent without scores

    async def has_speech(self, waveform: np.ndarray) -> bool:
        """True when the VAD finds any speech in this 16 kHz waveform. Its errors end the
        stream as the utterance events' do, except `overloaded`, which the session treats as a
        busy variant (the window is skipped)."""
        try:
            spans, _ = await self.finder.find(waveform, self.segments.vad,
                                              self.segments.vad_timeout_s)
        except ApiError as exc:
            raise StreamError.from_api(exc) from None
        return bool(spans)

    def silent_event(self, window: Window) -> dict:
        """The event of a window without speech (and counts it)."""
        self.silent += 1
        self.metrics.silent_window(self.variant)
        return {"type": "window", "start_s": window.start_s, "end_s": window.end_s,
                "speech": False, "skipped": window.skipped}
