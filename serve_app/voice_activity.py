"""The VAD's own Serve deployment: finds the speech in a 16 kHz waveform for the router
(POST /v1/segments without given segments, and the stream's utterance events).

Why a deployment of its own: the router stays torch-free (silero_vad imports torch), the
variants keep their single inference thread for emotion2vec, and the VAD gets its own CPU
share and replicas. It is stateless: the router sends the VAD settings with each call
(RouterSettings.segments.vad), so one config holds the whole route's settings.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os

import numpy as np
from ray import serve

from serve_app.config import VAD_NAME, VadSettings
from serve_app.errors import InvalidInput
from serve_app.inference.vad import SpeechDetector

# Recordings in VAD at once per replica: silero's sequence model runs one thread per call.
VAD_THREADS = 2


@serve.deployment(
    name=VAD_NAME,
    max_ongoing_requests=16,
    max_queued_requests=64,
    health_check_period_s=10,
)
class VoiceActivity:
    def __init__(self) -> None:
        self.detector = SpeechDetector()  # ~0.1 s: the model ships in silero-vad's wheel
        self.pid = os.getpid()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=VAD_THREADS, thread_name_prefix="vad")

    async def speech(self, waveform: np.ndarray, settings: dict) -> dict:
        """{"spans": [[start, end], ...] samples at 16 kHz, "vad_ms": time spent}."""
        if not isinstance(waveform, np.ndarray) or waveform.dtype != np.float32 \
                or waveform.ndim != 1:
            raise InvalidInput("expected a 1-D float32 numpy array at 16 kHz")
        vad = VadSettings.model_validate(settings)
        found = await asyncio.get_running_loop().run_in_executor(
            self._pool, self.detector.find, waveform, vad)
        return {"spans": [list(span) for span in found.spans], "vad_ms": found.vad_ms}

    def info(self) -> dict:
        return {"pid": self.pid, "threads": VAD_THREADS}
