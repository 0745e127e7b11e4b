"""Calling the VAD deployment (serve_app/voice_activity.py) from the ingress: a 16 kHz waveform
out, its speech spans back, within a deadline; Serve's errors mapped to API errors. Used by
POST /v1/segments and the stream's utterance events. No torch here."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import ray
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app.config import VadSettings
from serve_app.errors import ApiError
from serve_app.metrics import SegmentMetrics

logger = logging.getLogger("ray.serve")


class SpeechFinder:
    """Calls the VAD deployment: its spans for a 16 kHz waveform, within vad_timeout_s."""

    def __init__(self, handle: DeploymentHandle | None, metrics: SegmentMetrics):
        self.handle = handle
        self.metrics = metrics

    async def find(self, waveform: np.ndarray, vad: VadSettings,
                   timeout_s: float) -> tuple[list[tuple[int, int]], float]:
        if self.handle is None:
            raise ApiError(501, "vad_not_deployed", "this application has no VAD deployment: "
                           "give the segments (segments or rttm)")
        response = self.handle.speech.remote(waveform, vad.model_dump())
        try:
            out = await asyncio.wait_for(response, timeout=timeout_s)
        except TimeoutError:
            response.cancel()
            raise ApiError(504, "vad_timeout", f"the VAD did not answer within {timeout_s:g} s",
                           headers={"Retry-After": "5"}) from None
        except BackPressureError:
            raise ApiError(503, "overloaded", "the VAD is at capacity; retry later",
                           headers={"Retry-After": "2"}) from None
        except ray.exceptions.RayError as exc:
            logger.error("the VAD failed: %s", exc)
            raise ApiError(503, "vad_unavailable", "the VAD failed on this recording; retry",
                           headers={"Retry-After": "2"}) from None
        self.metrics.vad(out["vad_ms"])
        return [tuple(span) for span in out["spans"]], out["vad_ms"]
