"""Bytes of an audio file -> 16 kHz mono float32, with every limit checked on the way.

Two decoders, chosen by content: libsndfile first (wav, flac, ogg, mp3, ...: it recognises its
formats by their headers and refuses anything else in microseconds), then FFmpeg through PyAV
(`serve_app/audio/ffmpeg.py`: m4a/mp4/mov/3gp, webm/mkv, ADTS AAC, wma, amr) for what libsndfile
does not recognise. Never by file name or declared content type.

Limits are enforced before or while decoding, from the header first (duration), then per
block read, so a forged header cannot make the decoder allocate more than the cap.
"""

from __future__ import annotations

import io
import time

import soundfile

from serve_app.audio import ffmpeg as audio_av
from serve_app.audio.waveform import (
    TARGET_SR,
    Budget,
    DecodedAudio,
    Limits,
    check_format,
    to_waveform,
)
from serve_app.errors import ApiError

__all__ = ["TARGET_SR", "DecodedAudio", "Limits", "NotLibsndfileAudio", "decode",
           "decode_sndfile"]
_BLOCK_SAMPLES = 1 << 20  # per read, over all channels: bounds memory whatever the header says


class NotLibsndfileAudio(ApiError):
    """libsndfile does not recognise the bytes: another decoder may."""

    def __init__(self, reason: str):
        super().__init__(415, "unsupported_audio",
                         f"could not decode the upload as audio: {reason}")


def decode(data: bytes, *, max_duration_s: float, min_duration_s: float, **limits) -> DecodedAudio:
    """Decode, check and convert in this thread; every failure is an ApiError with a 4xx
    status. The router runs the FFmpeg path in worker processes instead
    (`serve_app/audio/pool.py`)."""
    bounds = Limits(max_duration_s, min_duration_s, **limits)
    try:
        return decode_sndfile(data, bounds)
    except NotLibsndfileAudio:
        return audio_av.decode(data, bounds)


def decode_sndfile(data: bytes, limits: Limits) -> DecodedAudio:
    """The libsndfile path; NotLibsndfileAudio when libsndfile does not recognise the bytes."""
    if not data:
        raise ApiError(422, "empty_audio", "the upload is empty")
    try:
        return _decode(data, limits)
    except ApiError:
        raise
    except Exception as exc:  # libsndfile and soxr raise many kinds on hostile files
        raise ApiError(415, "unsupported_audio", f"the audio could not be decoded: {exc}") \
            from None


def _decode(data: bytes, limits: Limits) -> DecodedAudio:
    started = time.monotonic()
    try:
        sound = soundfile.SoundFile(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise NotLibsndfileAudio(str(exc)) from None
    with sound:
        rate, channels = int(sound.samplerate), int(sound.channels)
        check_format(rate, channels, limits)
        budget = Budget(limits, rate, channels, started)
        if sound.frames < 2**62:  # libsndfile's "unknown"; the blocks are counted anyway
            budget.check_frames(sound.frames)  # before a sample is read
        blocks = []
        try:
            while True:
                block = sound.read(max(1, _BLOCK_SAMPLES // channels), dtype="float32",
                                   always_2d=True)
                if not len(block):
                    break
                budget.add(len(block))
                blocks.append(block)
        except soundfile.LibsndfileError as exc:
            raise ApiError(415, "unsupported_audio", f"the audio is corrupt: {exc}") from None
        fmt = sound.format
    return to_waveform(blocks, rate, channels, fmt, limits)
