"""Bytes of an audio file -> 16 kHz mono float32, with every limit checked on the way.

Limits are enforced before or while decoding, from the header first (duration), then per
block read, so a forged header cannot make the decoder allocate more than the cap.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile
import soxr

from serve_app.errors import ApiError

TARGET_SR = 16_000
MAX_CHANNELS = 32
MIN_RATE, MAX_RATE = 1_000, 384_000
_BLOCK_SAMPLES = 1 << 20  # per read, over all channels: bounds memory whatever the header says


@dataclass(frozen=True)
class DecodedAudio:
    waveform: np.ndarray  # float32, mono, TARGET_SR
    duration_s: float     # of the upload, before resampling
    sample_rate: int      # of the upload
    channels: int         # of the upload
    format: str


def decode(data: bytes, *, max_duration_s: float, min_duration_s: float) -> DecodedAudio:
    """Decode, check and convert; every failure is an ApiError with a 4xx status."""
    if not data:
        raise ApiError(422, "empty_audio", "the upload is empty")
    try:
        return _decode(data, max_duration_s, min_duration_s)
    except ApiError:
        raise
    except Exception as exc:  # libsndfile and soxr raise many kinds on hostile files
        raise ApiError(415, "unsupported_audio", f"the audio could not be decoded: {exc}") \
            from None


def _decode(data: bytes, max_duration_s: float, min_duration_s: float) -> DecodedAudio:
    try:
        sound = soundfile.SoundFile(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise ApiError(415, "unsupported_audio",
                       "could not decode the upload as audio (wav, flac, ogg, mp3 and the other "
                       f"formats of libsndfile are accepted): {exc}") from None
    with sound:
        rate, channels = int(sound.samplerate), int(sound.channels)
        if not MIN_RATE <= rate <= MAX_RATE:
            raise ApiError(422, "unsupported_sample_rate",
                           f"sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
        if not 1 <= channels <= MAX_CHANNELS:
            raise ApiError(422, "too_many_channels",
                           f"{channels} channels; at most {MAX_CHANNELS} are accepted")
        max_frames = int(max_duration_s * rate)
        if sound.frames > max_frames and sound.frames < 2**62:
            raise ApiError(413, "audio_too_long",
                           f"the audio lasts {sound.frames / rate:.1f} s; the limit is "
                           f"{max_duration_s:g} s")
        blocks, total = [], 0
        try:
            while True:
                block = sound.read(max(1, _BLOCK_SAMPLES // channels), dtype="float32",
                                   always_2d=True)
                if not len(block):
                    break
                total += len(block)
                if total > max_frames:
                    raise ApiError(413, "audio_too_long",
                                   f"the audio lasts over {max_duration_s:g} s, the limit")
                blocks.append(block)
        except soundfile.LibsndfileError as exc:
            raise ApiError(415, "unsupported_audio", f"the audio is corrupt: {exc}") from None
        fmt = sound.format
    if total == 0:
        raise ApiError(422, "empty_audio", "the audio holds no samples")
    samples = np.concatenate(blocks)
    if not np.isfinite(samples).all():
        raise ApiError(422, "invalid_samples", "the audio contains NaN or infinite samples")
    duration = total / rate
    if duration < min_duration_s:
        raise ApiError(422, "audio_too_short",
                       f"the audio lasts {duration * 1000:.0f} ms; at least "
                       f"{min_duration_s * 1000:.0f} ms are needed")
    mono = samples.mean(axis=1, dtype=np.float32) if channels > 1 else samples[:, 0]
    return DecodedAudio(to_target_rate(mono, rate), duration, rate, channels, fmt)


def to_target_rate(mono: np.ndarray, rate: int) -> np.ndarray:
    """float32 mono at `rate` -> contiguous float32 at TARGET_SR. The stream resamples its
    windows with this too, so that a window scores as a file of the same samples would."""
    if rate != TARGET_SR:
        mono = soxr.resample(mono, rate, TARGET_SR, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(mono, dtype=np.float32)
