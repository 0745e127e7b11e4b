"""A process that runs FFmpeg decodes for the router, one at a time (`serve_app/audio/pool.py`
starts and kills it), so that a decoder that hangs or crashes on a hostile file takes down
this process only.

Protocol on stdin/stdout, one message each way per decode: an 8-byte header (two little-endian
uint32: JSON length, payload length), the JSON, the payload. Request: the limits as JSON, the
file's bytes as payload. Answer: {"ok": true, duration_s, sample_rate, channels, format,
kept_channels} with the 16 kHz mono float32 waveform as payload (then each channel's, when
kept_channels), or {"ok": false, status, code, message}. The worker writes one empty-payload
{"ready": true} message once it has imported its libraries.
"""

from __future__ import annotations

import ctypes
import json
import resource
import signal
import struct
import sys
from typing import BinaryIO

HEADER = struct.Struct("<II")
_PR_SET_PDEATHSIG = 1
_HEADROOM = 1 << 30  # address space for FFmpeg's buffers, beyond what the imports mapped


def pack(meta: dict, payload: bytes = b"") -> bytes:
    text = json.dumps(meta).encode()
    return HEADER.pack(len(text), len(payload)) + text + payload


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def _confine() -> None:
    """Die with the router; never write a file."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # Linux, like the service
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def _mapped_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


def _cap_memory(baseline: int, max_decoded_bytes: int) -> None:
    """Room for the decoded samples, their copies and FFmpeg's buffers: a file that makes it
    allocate more gets MemoryError (413) here instead of exhausting the machine."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    wanted = baseline + _HEADROOM + 4 * max_decoded_bytes
    resource.setrlimit(resource.RLIMIT_AS, (wanted if hard == resource.RLIM_INFINITY
                                            else min(wanted, hard), hard))


def main() -> None:
    _confine()
    from serve_app.audio import ffmpeg as audio_av
    from serve_app.audio.waveform import Limits
    from serve_app.errors import ApiError

    baseline = _mapped_bytes()
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the protocol
    answers.write(pack({"ready": True}))
    answers.flush()
    while True:
        header = _read_exactly(requests, HEADER.size)
        if header is None:
            return  # the router closed the pipe
        meta_size, payload_size = HEADER.unpack(header)
        meta = _read_exactly(requests, meta_size)
        data = _read_exactly(requests, payload_size)
        if meta is None or data is None:
            return
        try:
            limits = Limits(**json.loads(meta))
            _cap_memory(baseline, limits.max_decoded_bytes)
            decoded = audio_av.decode(data, limits)
            apart = decoded.channel_waveforms
            payload = decoded.waveform.tobytes() + (b"" if apart is None else apart.tobytes())
            answer = pack({"ok": True, "duration_s": decoded.duration_s,
                           "sample_rate": decoded.sample_rate, "channels": decoded.channels,
                           "format": decoded.format, "kept_channels": apart is not None},
                          payload)
        except ApiError as exc:
            answer = pack({"ok": False, "status": exc.status, "code": exc.code,
                           "message": exc.message})
        except Exception as exc:  # whatever else: this file, not the worker, is at fault
            answer = pack({"ok": False, "status": 415, "code": "unsupported_audio",
                           "message": f"the audio could not be decoded: {exc}"})
        answers.write(answer)
        answers.flush()


if __name__ == "__main__":
    main()
