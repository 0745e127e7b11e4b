"""Finding the speech in a recording: silero-vad, with no Ray.

silero-vad (PyPI) ships its trained model in the wheel, so it runs offline. Its "sequence"
ONNX export runs a block of 512 frames (16 s) per onnxruntime call and gives the same
per-frame speech probabilities as the frame-by-frame model (silero's own claim, and what
tests/test_vad.py checks on a conversation); silero's own state machine
(`get_speech_timestamps_from_probs`) turns them into speech spans with the configured
threshold, minimum speech, minimum silence and padding; spans longer than max_segment_s are
then cut at their quietest point (serve_app/segments/cutting.py).

Importing silero_vad imports torch (and sets torch's threads to 1): this runs in the VAD's
own deployment (serve_app/voice_activity.py), never in the router.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from serve_app.audio.waveform import TARGET_SR
from serve_app.config import VadSettings
from serve_app.segments.cutting import cut_long


@dataclass(frozen=True)
class SpeechFound:
    spans: list[tuple[int, int]]  # [start, end) samples at 16 kHz, in order, not overlapping
    vad_ms: float                 # time spent, probabilities and spans


class SpeechDetector:
    """silero-vad's sequence model. `find` may run in several threads at once: each call
    carries its own recurrent state through the (thread-safe) onnxruntime session."""

    def __init__(self) -> None:
        from silero_vad import load_silero_vad

        self.model = load_silero_vad(sequence=True)

    def probabilities(self, waveform: np.ndarray) -> np.ndarray:
        """Speech probability of each 512-sample (32 ms) frame of a 16 kHz waveform."""
        return self.model.audio_forward(np.ascontiguousarray(waveform, dtype=np.float32),
                                        sampling_rate=TARGET_SR)

    def find(self, waveform: np.ndarray, settings: VadSettings) -> SpeechFound:
        from silero_vad.utils_vad import get_speech_timestamps_from_probs

        started = time.perf_counter()
        if len(waveform) == 0:
            return SpeechFound([], 0.0)
        probabilities = self.probabilities(waveform)
        found = get_speech_timestamps_from_probs(
            probabilities.tolist(), sampling_rate=TARGET_SR, threshold=settings.threshold,
            min_speech_duration_ms=settings.min_speech_s * 1000,
            min_silence_duration_ms=settings.min_silence_s * 1000,
            speech_pad_ms=settings.pad_s * 1000, audio_length_samples=len(waveform))
        spans = [(int(item["start"]), int(item["end"])) for item in found]
        spans = cut_long(spans, waveform, int(settings.max_segment_s * TARGET_SR),
                         max(1, int(settings.min_speech_s * TARGET_SR)))
        return SpeechFound(spans, round((time.perf_counter() - started) * 1000, 3))
