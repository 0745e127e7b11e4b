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
    # Also each channel on its own at TARGET_SR (POST /v1/segments with channels=split).
    keep_channels: bool = False
    max_channels: int = MAX_CHANNELS

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DecodedAudio:
    waveform: np.ndarray  # float32, mono, TARGET_SR
    duration_s: float     # of the upload, before resampling
    sample_rate: int      # of the upload
    channels: int         # of the upload
    format: str
    # channels x samples, float32 at TARGET_SR: when Limits.keep_channels and channels > 1
    channel_waveforms: np.ndarray | None = None


def check_format(rate: int, channels: int, limits: Limits) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ApiError(422, "unsupported_sample_rate",
                       f"sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
    if not 1 <= channels <= limits.max_channels:
        apart = " scored apart" if limits.keep_channels else ""
        raise ApiError(422, "too_many_channels",
                       f"{channels} channels; at most {limits.max_channels}{apart} are accepted")


def too_long(max_duration_s: float, seconds: float | None = None) -> ApiError:
    lasts = f"lasts {seconds:.1f} s" if seconds is not None else "lasts over the limit"
    return ApiError(413, "audio_too_long",
                    f"the audio {lasts}; the limit is {max_duration_s:g} s")


def upload_too_large(limit_bytes: int, what: str = "the upload") -> ApiError:
    """The one 413 of a body, a file or an element over its size cap."""
    return ApiError(413, "payload_too_large",
                    f"{what} is larger than the limit of {limit_bytes} bytes")


def bytes_per_frame(rate: int, channels: int, keep_channels: bool) -> float:
    """What to_waveform allocates per frame of the file, in float32: the decoded blocks
    (every channel), the mono mix at the file's rate and at TARGET_SR, and with the channels
    kept apart, one channel at the file's rate and every channel at TARGET_SR (a 1 kHz file
    grows 16 times there)."""
    to_target = TARGET_SR / rate
    per_frame = channels + 1 + to_target
    if keep_channels and channels > 1:
        per_frame += 1 + channels * to_target
    return 4 * per_frame


class Budget:
    """What one decode will allocate, counted as it goes (and from the header, where there is
    one); refuses as soon as a limit is passed."""

    def __init__(self, limits: Limits, rate: int, channels: int, started: float):
        self.limits, self.rate, self.started = limits, rate, started
        self.max_frames = int(limits.max_duration_s * rate)
        self.bytes_per_frame = bytes_per_frame(rate, channels, limits.keep_channels)
        self.frames = 0

    def check_frames(self, frames: int) -> None:
        """A decode of `frames` frames: refused now if it would pass a limit."""
        if frames > self.max_frames:
            raise too_long(self.limits.max_duration_s, frames / self.rate)
        if frames * self.bytes_per_frame > self.limits.max_decoded_bytes:
            raise ApiError(413, "decoded_too_large", "the decoded audio would take over "
                           f"{self.limits.max_decoded_bytes} bytes, the limit")

    def add(self, frames: int) -> None:
        self.frames += frames
        if self.frames > self.max_frames:
            raise too_long(self.limits.max_duration_s)
        self.check_frames(self.frames)
        check_time(self.limits, self.started)


def check_time(limits: Limits, started: float) -> None:
    if time.monotonic() - started > limits.max_decode_s:
        raise ApiError(413, "decode_too_slow",
                       f"decoding took over {limits.max_decode_s:g} s, the limit")


def to_waveform(blocks: list[np.ndarray], rate: int, channels: int, fmt: str,
                limits: Limits) -> DecodedAudio:
    """(frames, channels) float32 blocks -> checked, downmixed, resampled DecodedAudio.
    The blocks are consumed (the list is emptied as they are downmixed): a long recording is
    not held twice."""
    total = sum(len(block) for block in blocks)
    if total == 0:
        raise ApiError(422, "empty_audio", "the audio holds no samples")
    if not all(np.isfinite(block).all() for block in blocks):
        raise ApiError(422, "invalid_samples", "the audio contains NaN or infinite samples")
    duration = total / rate
    if duration < limits.min_duration_s:
        raise ApiError(422, "audio_too_short",
                       f"the audio lasts {duration * 1000:.0f} ms; at least "
                       f"{limits.min_duration_s * 1000:.0f} ms are needed")
    keep = limits.keep_channels and channels > 1
    separate = _channels_apart(blocks, channels, rate) if keep else None
    mono = np.empty(total, np.float32)
    position = 0
    blocks.reverse()
    while blocks:
        block = blocks.pop()
        # Row by row, as the mean over the whole array would be: the same samples.
        end = position + len(block)
        mono[position:end] = block.mean(axis=1, dtype=np.float32) if channels > 1 \
            else block[:, 0]
        position = end
    return DecodedAudio(to_target_rate(mono, rate), duration, rate, channels, fmt, separate)


def _channels_apart(blocks: list[np.ndarray], channels: int, rate: int) -> np.ndarray:
    """Each channel at TARGET_SR, into one array allocated once; one channel at the file's
    rate is held at a time."""
    separate = None
    for channel in range(channels):
        samples = to_target_rate(np.concatenate([block[:, channel] for block in blocks]), rate)
        if separate is None:
            separate = np.empty((channels, len(samples)), np.float32)
        separate[channel] = samples
    return separate


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
    check_format(rate, samples.shape[1], limits)
    Budget(limits, rate, samples.shape[1], time.monotonic()).add(len(samples))
    return to_waveform([samples], rate, samples.shape[1], fmt, limits)


def to_target_rate(mono: np.ndarray, rate: int) -> np.ndarray:
    """float32 mono at `rate` -> contiguous float32 at TARGET_SR. The stream resamples its
    windows with this too, so that a window scores as a file of the same samples would."""
    if rate != TARGET_SR:
        import soxr  # here: serve_app.config imports this module's limits, and must stay light

        mono = soxr.resample(mono, rate, TARGET_SR, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(mono, dtype=np.float32)
