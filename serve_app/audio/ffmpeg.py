"""The FFmpeg decoding path (PyAV): what libsndfile does not read, such as m4a/mp4/mov/3gp
(AAC, ALAC, AMR), webm/mkv (Opus, Vorbis), raw ADTS AAC, wma and amr.

FFmpeg's demuxers can open other files and URLs (playlists, concat lists, image sequences,
external data references of mov files). Here the upload is read from memory only, probing
is restricted to an allow-list of audio and container demuxers, nested opens are refused by a
protocol allow-list that names no protocol, and only an allow-list of audio decoders may be
opened: video streams are never decoded (not even while probing) and are discarded by the
demuxer. The limits hold per decoded frame, whatever the header says.
"""

from __future__ import annotations

import io
import time

import av
import numpy as np
from av.stream import Discard

from serve_app.audio.waveform import (
    Budget,
    DecodedAudio,
    Limits,
    check_format,
    check_time,
    to_waveform,
    too_long,
)
from serve_app.errors import ApiError

# FFmpeg demuxer names: mov = mp4/m4a/mov/3gp, matroska = mkv/webm, aac = ADTS, asf = wma.
DEMUXERS = ("mov", "matroska", "aac", "asf", "amr", "ogg", "wav", "flac", "mp3")
DECODERS = ("aac", "aac_latm", "alac", "opus", "vorbis", "flac", "mp3float", "mp3", "mp2float",
            "mp2", "ac3", "eac3", "wmav1", "wmav2", "wmapro", "wmalossless", "wmavoice",
            "amrnb", "amrwb", "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be", "pcm_s32le",
            "pcm_s32be", "pcm_f32le", "pcm_f32be", "pcm_f64le", "pcm_f64be", "pcm_u8",
            "pcm_s8", "pcm_alaw", "pcm_mulaw")
# These demuxers guess the duration from the bit rate: only the decoded frames count.
_GUESSED_DURATION = {"aac", "mp3", "amr"}
# Decoded vs declared duration differ by priming and padding (tens of ms): a larger shortfall
# means the data end early (a truncated upload, or corruption the demuxer stopped at).
_SHORTFALL_S = 0.25
_MOV_BRANDS = {"M4A": "M4A", "M4B": "M4A", "qt": "MOV", "3gp": "3GP", "3g2": "3G2"}
_INT_SCALE = {"s16": 2.0**15, "s32": 2.0**31, "s64": 2.0**63}


def container_options(demuxers: tuple[str, ...] = DEMUXERS) -> dict[str, str]:
    return {
        "format_whitelist": ",".join(demuxers),
        # Nested opens (playlist entries, concat items, mov data references) go through a
        # protocol; "none" names no protocol, so every one of them is refused.
        "protocol_whitelist": "none",
        "codec_whitelist": ",".join(DECODERS),
        "enable_drefs": "0",
        "max_streams": "32",
    }


def decode(data: bytes, limits: Limits) -> DecodedAudio:
    """Decode, check and convert with FFmpeg; every failure is an ApiError with a 4xx status."""
    if not data:
        raise ApiError(422, "empty_audio", "the upload is empty")
    started = time.monotonic()
    try:
        return _decode(data, limits, started)
    except ApiError:
        raise
    except MemoryError:
        raise ApiError(413, "decoded_too_large", "the audio needs too much memory to decode") \
            from None
    except Exception as exc:  # FFmpeg errors of every kind on hostile or truncated files
        check_time(limits, started)  # an interrupted decode is a slow one, not a corrupt one
        raise ApiError(415, "unsupported_audio",
                       "could not decode the upload as audio (wav, flac, ogg, mp3, m4a/mp4/mov/"
                       f"3gp, webm/mkv, aac, wma and amr are accepted): {exc}") from None


def _decode(data: bytes, limits: Limits, started: float) -> DecodedAudio:
    # The interrupt callback stops FFmpeg's own I/O loops when a read takes too long.
    with av.open(io.BytesIO(data), mode="r", container_options=container_options(),
                 timeout=limits.max_decode_s, metadata_errors="replace") as container:
        if not container.streams.audio:
            if container.streams.video or container.streams.subtitles:
                raise ApiError(422, "no_audio_stream", "the file holds no audio stream")
            # Streams of no known kind: what a truncated or damaged index leaves.
            raise ApiError(415, "unsupported_audio", "no audio stream could be read")
        stream = container.streams.audio[0]
        for other in container.streams:
            if other.index != stream.index:
                other.discard = Discard.all  # their packets are dropped by the demuxer
        codec = stream.codec_context
        if codec is None or codec.name not in DECODERS:
            name = "unknown" if codec is None else codec.name
            raise ApiError(415, "unsupported_audio", f"the audio codec {name!r} is not supported")
        if codec.sample_rate and codec.channels:
            check_format(codec.sample_rate, codec.channels, limits)
        declared = _declared_seconds(container, stream)
        if declared is not None and declared > limits.max_duration_s:
            raise too_long(limits.max_duration_s, declared)
        blocks, budget = [], None
        for packet in container.demux(stream):
            for frame in packet.decode():
                samples = _as_float(frame)
                if budget is None:
                    rate, channels = frame.sample_rate, samples.shape[1]
                    check_format(rate, channels, limits)
                    budget = Budget(limits, rate, channels, started)
                elif (frame.sample_rate, samples.shape[1]) != (rate, channels):
                    raise ApiError(415, "unsupported_audio",
                                   "the audio changes sample rate or channels mid-stream")
                budget.add(len(samples))
                blocks.append(samples)
            check_time(limits, started)
        if budget is None:
            raise ApiError(422, "empty_audio", "the audio holds no samples")
        decoded = budget.frames / rate
        if declared is not None and decoded < declared * 0.99 - _SHORTFALL_S:
            raise ApiError(415, "unsupported_audio", f"the audio is truncated or corrupt: its "
                           f"header says {declared:.2f} s, {decoded:.2f} s could be decoded")
        return to_waveform(blocks, rate, channels, _format_name(container, stream, data),
                           limits)


def _declared_seconds(container, stream) -> float | None:
    """The duration the header states, when the demuxer read one (not a bit-rate guess)."""
    if container.format.name in _GUESSED_DURATION:
        return None
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _as_float(frame) -> np.ndarray:
    """A decoded frame as (samples, channels) float32 in [-1, 1], scaled as libsndfile does."""
    array = frame.to_ndarray()
    channels = frame.layout.nb_channels
    array = array.T if frame.format.is_planar else array.reshape(-1, channels)
    name = frame.format.name.rstrip("p")
    if name in _INT_SCALE:
        return (array / np.float32(_INT_SCALE[name])).astype(np.float32)
    if name == "u8":
        return ((array.astype(np.float32) - 128) / 128).astype(np.float32)
    return array.astype(np.float32)


def _format_name(container, stream, data: bytes) -> str:
    """CONTAINER/CODEC, e.g. M4A/AAC, WEBM/OPUS, ASF/WMAV2."""
    family = container.format.name.split(",")[0]
    if family == "mov":
        brand = container.metadata.get("major_brand", "").strip()
        family = next((name for prefix, name in _MOV_BRANDS.items() if brand.startswith(prefix)),
                      "MP4")
    elif family == "matroska" and b"\x42\x82\x84webm" in data[:64]:  # EBML DocType "webm"
        family = "webm"
    elif family == "aac":
        family = "adts"
    return f"{family.upper()}/{stream.codec.canonical_name.upper()}"
