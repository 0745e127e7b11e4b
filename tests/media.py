"""Recordings in the formats people have, encoded on the spot with PyAV (no system ffmpeg):
m4a, mp4 with video, mov, 3gp, webm, mkv, ADTS, wma, amr; and audio bombs, hours of silence
in a few hundred kB, made by muxing one encoded packet over and over."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import av
import numpy as np


@dataclass(frozen=True)
class Spec:
    container: str           # FFmpeg muxer
    codec: str               # FFmpeg encoder
    rate: int
    channels: int = 1
    bit_rate: int | None = None
    video: bool = False      # a video track before the audio track
    options: dict = field(default_factory=dict)        # muxer options
    codec_options: dict = field(default_factory=dict)  # encoder options


# name: (spec, the format the service reports)
FORMATS = {
    "m4a_aac": (Spec("ipod", "aac", 44_100), "M4A/AAC"),
    "m4a_alac": (Spec("ipod", "alac", 44_100, channels=2), "M4A/ALAC"),
    "mp4_video_aac": (Spec("mp4", "aac", 48_000, video=True), "MP4/AAC"),
    "mov_aac": (Spec("mov", "aac", 48_000, channels=2), "MOV/AAC"),
    "3gp_amr": (Spec("3gp", "libopencore_amrnb", 8_000, bit_rate=12_200), "3GP/AMR_NB"),
    "3gp_aac": (Spec("3gp", "aac", 22_050), "3GP/AAC"),
    "webm_opus": (Spec("webm", "libopus", 48_000), "WEBM/OPUS"),
    "mkv_vorbis": (Spec("matroska", "vorbis", 44_100, channels=2,
                        codec_options={"strict": "experimental"}), "MATROSKA/VORBIS"),
    "adts_aac": (Spec("adts", "aac", 44_100), "ADTS/AAC"),
    "wma": (Spec("asf", "wmav2", 44_100, bit_rate=64_000), "ASF/WMAV2"),
    "amr": (Spec("amr", "libopencore_amrnb", 8_000, bit_rate=12_200), "AMR/AMR_NB"),
}


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 220.0) -> np.ndarray:
    """(channels, samples) float32: a tone with harmonics, each channel a little different."""
    t = np.arange(int(seconds * rate)) / rate
    rows = [0.3 * np.sin(2 * np.pi * freq * (1 + 0.25 * c) * t) + 0.05 * np.sin(
        2 * np.pi * 3 * freq * t) for c in range(channels)]
    return np.asarray(rows, dtype=np.float32)


def _frame(samples: np.ndarray, fmt: av.AudioFormat, layout: str, rate: int,
           pts: int) -> av.AudioFrame:
    array = samples if fmt.is_planar else samples.T.reshape(1, -1)
    if fmt.name.startswith("s16"):
        array = (array * 32767).astype(np.int16)
    elif fmt.name.startswith("s32"):
        array = (array * 2147483647).astype(np.int32)
    else:
        array = array.astype(np.float32)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(array), format=fmt.name,
                                       layout=layout)
    frame.sample_rate, frame.pts = rate, pts
    return frame


def _open(spec: Spec, buffer: io.BytesIO):
    out = av.open(buffer, "w", format=spec.container, options=spec.options)
    video = None
    if spec.video:
        video = out.add_stream("mpeg4", rate=10)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
    stream = out.add_stream(spec.codec, rate=spec.rate,
                            layout="mono" if spec.channels == 1 else "stereo")
    if spec.bit_rate:
        stream.bit_rate = spec.bit_rate
    if spec.codec_options:
        stream.codec_context.options = dict(spec.codec_options)
    stream.codec_context.open()  # now frame_size is the encoder's
    return out, stream, video


def encode(spec: Spec, seconds: float = 2.0, samples: np.ndarray | None = None) -> bytes:
    """`seconds` of a tone (or the given (channels, n) samples) in this format."""
    samples = tone(seconds, spec.rate, spec.channels) if samples is None else samples
    buffer = io.BytesIO()
    out, stream, video = _open(spec, buffer)
    with out:
        if video is not None:
            for index in range(int(seconds * 10)):
                image = np.full((32, 32, 3), index * 8 % 256, np.uint8)
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = index
                out.mux(video.encode(frame))
            out.mux(video.encode(None))
        fmt = stream.codec_context.codec.audio_formats[0]
        size = stream.codec_context.frame_size or 1024
        for start in range(0, samples.shape[1], size):
            out.mux(stream.encode(_frame(samples[:, start:start + size], fmt,
                                         stream.layout.name, spec.rate, start)))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def bomb(spec: Spec, seconds: float) -> bytes:
    """`seconds` of silence: one second encoded, then one silent packet muxed again and again
    with advancing timestamps (seconds of audio in bytes, in a fraction of a second)."""
    buffer = io.BytesIO()
    out, stream, _ = _open(spec, buffer)
    with out:
        fmt = stream.codec_context.codec.audio_formats[0]
        size = stream.codec_context.frame_size or 1024
        silence = np.zeros((spec.channels, size), np.float32)
        packets, pts = [], 0
        while pts < spec.rate:
            packets += stream.encode(_frame(silence, fmt, stream.layout.name, spec.rate, pts))
            pts += size
        model = packets[len(packets) // 2]
        payload, time_base, step = bytes(model), model.time_base, model.duration or size
        position = packets[-1].pts + step  # before muxing: mux rebases packets in place
        out.mux(packets)
        while position * time_base < seconds:
            packet = av.Packet(payload)
            packet.stream, packet.time_base = stream, time_base
            packet.pts = packet.dts = position
            packet.duration = step
            out.mux(packet)
            position += step
    return buffer.getvalue()
