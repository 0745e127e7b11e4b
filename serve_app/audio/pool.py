"""Decoding for the router: libsndfile in a thread, FFmpeg in worker processes.

A hang inside one FFmpeg call cannot be interrupted from a thread, and a crash in it would take
the router down; so the FFmpeg path runs in a small pool of processes (`decode_worker.py`),
each decoding one file at a time under a hard deadline: a worker that misses it is killed and
the request gets 415, a worker that dies gets 415 too; either is replaced on the next request.
Waiting for a free worker is bounded in count and time (503 with Retry-After beyond that).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from serve_app.audio import ffmpeg as audio_av
from serve_app.audio import sndfile
from serve_app.audio.waveform import DecodedAudio, Limits
from serve_app.audio.worker import HEADER, pack
from serve_app.errors import ApiError

logger = logging.getLogger("ray.serve")

WORKER_COMMAND = (sys.executable, "-m", "serve_app.audio.worker")
START_TIMEOUT_S = 30.0  # a fresh worker imports numpy and FFmpeg's libraries
MAX_WAITING = 64        # requests waiting for a free worker; more get 503 at once
# A worker decodes one file at a time: no thread pools in numpy's libraries.
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def hard_timeout_s(limits: Limits) -> float:
    """The worker checks max_decode_s itself between frames; this is for a call that hangs."""
    return limits.max_decode_s * 1.5 + 1.0


class DecodePool:
    """`size` worker processes, started on demand, each running one decode at a time."""

    def __init__(self, size: int):
        self.size = size
        self._slots = asyncio.Semaphore(size)
        self._idle: list[asyncio.subprocess.Process] = []
        self._waiting = 0
        self._closed = False
        self.failures = 0  # workers killed for missing the deadline, or found dead

    def pids(self) -> list[int]:
        return [worker.pid for worker in self._idle]

    async def decode(self, data: bytes, limits: Limits) -> DecodedAudio:
        if self._waiting >= MAX_WAITING:
            raise _busy()
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=limits.max_decode_s)
        except TimeoutError:
            raise _busy() from None
        finally:
            self._waiting -= 1
        try:
            worker = await self._take()
            healthy = False
            try:
                meta, payload = await asyncio.wait_for(
                    self._call(worker, data, limits), timeout=hard_timeout_s(limits))
                healthy = True
            except TimeoutError:
                self.failures += 1
                logger.warning("decode worker %d missed its deadline: killed", worker.pid)
                raise ApiError(415, "unsupported_audio", "the audio could not be decoded "
                               f"within {hard_timeout_s(limits):g} s") from None
            except (ConnectionError, EOFError, ValueError):  # died, or garbled its answer
                self.failures += 1
                logger.warning("decode worker %d died on a file", worker.pid)
                raise ApiError(415, "unsupported_audio",
                               "the decoder failed on this file") from None
            finally:  # a worker left mid-request (deadline, death, cancellation) is not reused
                if healthy and not self._closed:
                    self._idle.append(worker)
                else:
                    await _kill(worker)
        finally:
            self._slots.release()
        return _answer(meta, payload)

    async def _take(self) -> asyncio.subprocess.Process:
        while self._idle:
            worker = self._idle.pop()
            if worker.returncode is None:
                return worker
        return await self._start()

    async def _start(self) -> asyncio.subprocess.Process:
        root = str(Path(__file__).resolve().parents[2])  # the folder that holds serve_app
        env = {**os.environ, **_ONE_THREAD, "PYTHONPATH": os.pathsep.join(
            filter(None, [root, os.environ.get("PYTHONPATH")]))}
        worker = await asyncio.create_subprocess_exec(
            *WORKER_COMMAND, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=env)
        ready = False
        try:
            meta, _ = await asyncio.wait_for(_read(worker), timeout=START_TIMEOUT_S)
            ready = meta.get("ready") is True
        except Exception as exc:
            logger.error("decode worker did not start: %r", exc)
        finally:
            if not ready:
                await _kill(worker)
        if not ready:
            raise ApiError(503, "decoder_unavailable", "the decoder could not start; retry "
                           "later", headers={"Retry-After": "5"})
        return worker

    @staticmethod
    async def _call(worker: asyncio.subprocess.Process, data: bytes,
                    limits: Limits) -> tuple[dict, bytes]:
        worker.stdin.write(pack(limits.as_dict(), data))
        await worker.stdin.drain()
        return await _read(worker)

    async def close(self) -> None:
        """Kill the idle workers now; busy ones are killed when their decode ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_kill(worker) for worker in idle))


async def _read(worker: asyncio.subprocess.Process) -> tuple[dict, bytes]:
    meta_size, payload_size = HEADER.unpack(await worker.stdout.readexactly(HEADER.size))
    meta = json.loads(await worker.stdout.readexactly(meta_size))
    return meta, await worker.stdout.readexactly(payload_size)


async def _kill(worker: asyncio.subprocess.Process) -> None:
    if worker.returncode is None:
        worker.kill()
    try:
        await asyncio.wait_for(worker.wait(), timeout=5)
    except TimeoutError:
        logger.error("decode worker %d did not exit after SIGKILL", worker.pid)


def _answer(meta: dict, payload: bytes) -> DecodedAudio:
    if not meta.get("ok"):
        raise ApiError(meta["status"], meta["code"], meta["message"])
    samples = np.frombuffer(payload, dtype=np.float32)
    apart = None
    if meta.get("kept_channels"):  # the mono waveform, then each channel's
        samples = samples.reshape(meta["channels"] + 1, -1)
        samples, apart = samples[0], samples[1:]
    return DecodedAudio(samples, meta["duration_s"], meta["sample_rate"], meta["channels"],
                        meta["format"], apart)


def _busy() -> ApiError:
    return ApiError(503, "overloaded", "the decoders are busy; retry later",
                    headers={"Retry-After": "1"})


class Decoder:
    """Picks the decoder by content: libsndfile first (in a thread), and for what it does not
    recognise FFmpeg, in the worker pool (workers > 0) or in a thread (workers = 0)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = DecodePool(workers) if workers > 0 else None

    async def decode(self, data: bytes, limits: Limits) -> DecodedAudio:
        try:
            return await asyncio.to_thread(sndfile.decode_sndfile, data, limits)
        except sndfile.NotLibsndfileAudio:
            pass
        if self.pool is None:
            return await asyncio.to_thread(audio_av.decode, data, limits)
        return await self.pool.decode(data, limits)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
