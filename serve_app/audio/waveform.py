"""What every decoder shares: the limits, the format bounds, and the last steps from decoded
samples to the model's input (16 kHz mono float32), so that two decoders reading the same
samples give the same waveform."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from serve_app.errors import ApiError
from serve_app.wire import TARGET_SR

MAX_CHANNELS = 32
MIN_RATE, MAX_RATE = 1_000, 384_000
# The defaults of RouterSettings' decode limits (serve_app/config.py), defined here, where
# they are checked, because config imports this module (and not the other way round).
MAX_DECODED_BYTES = 256 * 2**20  # decoded float32 samples, all channels
MAX_DECODE_S = 10.0              # wall time of one decode
MIN_DURATION_S = 0.1             # shorter audio carries no emotion (the conv stem needs 25 ms)


@dataclass(frozen=True)
class Limits:
    """Checked while decoding, whatever the file's header says."""

    max_duration_s: float
    min_duration_s: float = MIN_DURATION_S
    max_decoded_bytes: int = MAX_DECODED_BYTES
    max_decode_s: float = MAX_DECODE_S

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DecodedAudio:
    waveform: np.ndarray  # float32, mono, TARGET_SR
    duration_s: float     # of the upload, before resampling
    sample_rate: int      # of the upload
    channels: int         # of the upload
    format: str


def check_format(rate: int, channels: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ApiError(422, "unsupported_sample_rate",
                       f"sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise ApiError(422, "too_many_channels",
                       f"{channels} channels; at most {MAX_CHANNELS} are accepted")


def too_long(max_duration_s: float, seconds: float | None = None) -> ApiError:
    lasts = f"lasts {seconds:.1f} s" if seconds is not None else "lasts over the limit"
    return ApiError(413, "audio_too_long",
                    f"the audio {lasts}; the limit is {max_duration_s:g} s")


def upload_too_large(limit_bytes: int) -> ApiError:
    return ApiError(413, "payload_too_large",
                    f"the upload is larger than the limit of {limit_bytes} bytes")


class Budget:
    """What one decode has produced so far; refuses as soon as a limit is passed."""

    def __init__(self, limits: Limits, rate: int, channels: int, started: float):
        self.limits, self.rate, self.started = limits, rate, started
        self.max_frames = int(limits.max_duration_s * rate)
        self.bytes_per_frame = 4 * channels
        self.frames = 0

    def add(self, frames: int) -> None:
        self.frames += frames
        if self.frames > self.max_frames:
            raise too_long(self.limits.max_duration_s)
        if self.frames * self.bytes_per_frame > self.limits.max_decoded_bytes:
            raise ApiError(413, "decoded_too_large", "the decoded audio is over "
                           f"{self.limits.max_decoded_bytes} bytes, the limit")
        check_time(self.limits, self.started)


def check_time(limits: Limits, started: float) -> None:
    if time.monotonic() - started > limits.max_decode_s:
        raise ApiError(413, "decode_too_slow",
                       f"decoding took over {limits.max_decode_s:g} s, the limit")


def to_waveform(blocks: list[np.ndarray], rate: int, channels: int, fmt: str,
                limits: Limits) -> DecodedAudio:
    """(frames, channels) float32 blocks -> checked, downmixed, resampled DecodedAudio."""
    total = sum(len(block) for block in blocks)
    if total == 0:
        raise ApiError(422, "empty_audio", "the audio holds no samples")
    samples = np.concatenate(blocks)
    if not np.isfinite(samples).all():
        raise ApiError(422, "invalid_samples", "the audio contains NaN or infinite samples")
    duration = total / rate
    if duration < limits.min_duration_s:
        raise ApiError(422, "audio_too_short",
                       f"the audio lasts {duration * 1000:.0f} ms; at least "
                       f"{limits.min_duration_s * 1000:.0f} ms are needed")
    mono = samples.mean(axis=1, dtype=np.float32) if channels > 1 else samples[:, 0]
    return DecodedAudio(to_target_rate(mono, rate), duration, rate, channels, fmt)


def from_samples(samples: np.ndarray, rate: int, fmt: str, limits: Limits) -> DecodedAudio:
    """Audio that arrives already decoded (a waveform in a JSON or tensor request): 1-D mono or
    (frames, channels), float or int16 (read as libsndfile reads 16-bit PCM), checked against
    the same limits as a decoded file, then downmixed and resampled as a file of it would be."""
    samples = np.asarray(samples)
    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.ndim != 2:
        raise ApiError(422, "invalid_waveform", f"a waveform has 1 dimension (mono) or 2 "
                       f"(frames, channels), not {samples.ndim}")
    if samples.dtype == np.int16:
        samples = samples.astype(np.float32) * np.float32(1 / 32768)
    elif np.issubdtype(samples.dtype, np.floating):
        samples = samples.astype(np.float32, copy=False)
    else:
        raise ApiError(422, "invalid_waveform",
                       f"waveform samples must be float or int16, not {samples.dtype}")
    check_format(rate, samples.shape[1])
    Budget(limits, rate, samples.shape[1], time.monotonic()).add(len(samples))
    return to_waveform([samples], rate, samples.shape[1], fmt, limits)


def to_target_rate(mono: np.ndarray, rate: int) -> np.ndarray:
    """float32 mono at `rate` -> contiguous float32 at TARGET_SR. The stream resamples its
    windows with this too, so that a window scores as a file of the same samples would."""
    if rate != TARGET_SR:
        import soxr  # here: serve_app.config imports this module's limits, and must stay light

        mono = soxr.resample(mono, rate, TARGET_SR, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(mono, dtype=np.float32)
