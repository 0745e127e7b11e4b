"""The decoder worker processes: same samples as in a thread, and a worker that hangs, dies or
is abandoned is killed and replaced while the caller gets a 4xx (or 503 when all are busy)."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from serve_app.audio import ffmpeg as audio_av
from serve_app.audio import pool as decode_pool
from serve_app.audio.pool import DecodePool, Decoder
from serve_app.audio.waveform import Limits
from serve_app.errors import ApiError
from tests import media
from tests.media import FORMATS
from tests.waiting import eventually

LIMITS = Limits(max_duration_s=30)


@pytest.fixture(scope="module")
def m4a() -> bytes:
    return media.encode(FORMATS["m4a_aac"][0], 1.0)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _stuck(pool: DecodePool, data: bytes,
                 limits: Limits = LIMITS) -> tuple[int, asyncio.Task]:
    """A decode in flight on a stopped worker: as one stuck inside an FFmpeg call."""
    await pool.decode(data, LIMITS)
    (pid,) = pool.pids()
    os.kill(pid, signal.SIGSTOP)
    decoding = asyncio.create_task(pool.decode(data, limits))
    await asyncio.sleep(0.1)
    return pid, decoding


def _run(coroutine_function):
    """Run a test body with its own pool of one worker, closed after."""
    async def body():
        pool = DecodePool(1)
        try:
            await coroutine_function(pool)
        finally:
            await pool.close()
    asyncio.run(body())


def test_workers_give_the_samples_of_a_thread_and_are_reused():
    files = {name: media.encode(FORMATS[name][0], 1.0)
             for name in ("m4a_aac", "webm_opus", "wma")}
    wav = io.BytesIO()
    soundfile.write(wav, media.tone(1.0, 16_000)[0], 16_000, format="WAV")

    async def body(pool: DecodePool):
        pids = set()
        for name, data in files.items():
            isolated = await pool.decode(data, LIMITS)
            in_thread = audio_av.decode(data, LIMITS)
            assert np.array_equal(isolated.waveform, in_thread.waveform), name
            assert (isolated.duration_s, isolated.sample_rate, isolated.channels,
                    isolated.format) == (in_thread.duration_s, in_thread.sample_rate,
                                         in_thread.channels, in_thread.format)
            pids.update(pool.pids())
        assert len(pids) == 1  # one worker served them all
        limits = (Path("/proc") / str(*pids) / "limits").read_text()
        assert re.search(r"Max file size\s+0\s+0", limits)  # it can write no file
        assert not re.search(r"Max address space\s+unlimited", limits)
        with pytest.raises(ApiError) as refused:
            await pool.decode(b"not audio at all" * 10, LIMITS)
        assert refused.value.status == 415 and pool.pids() == list(pids)

        for decoder in (Decoder(0), Decoder(1)):  # libsndfile for wav, FFmpeg for the rest
            try:
                assert (await decoder.decode(wav.getvalue(), LIMITS)).format == "WAV"
                assert (await decoder.decode(files["wma"], LIMITS)).format == "ASF/WMAV2"
            finally:
                await decoder.close()
    _run(body)


def test_a_hanging_worker_is_killed_and_replaced(m4a):
    async def body(pool: DecodePool):
        await pool.decode(m4a, LIMITS)
        (stuck,) = pool.pids()
        os.kill(stuck, signal.SIGSTOP)  # as a decoder stuck inside one FFmpeg call
        limits = Limits(30, max_decode_s=0.4)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ApiError) as refused:
            await pool.decode(m4a, limits)
        assert refused.value.status == 415
        assert loop.time() - started < decode_pool.hard_timeout_s(limits) + 2
        assert _gone(stuck) and pool.failures == 1
        assert (await pool.decode(m4a, LIMITS)).format == "M4A/AAC"
        assert pool.pids() != [stuck]
    _run(body)


def test_a_crashing_worker_answers_415_and_is_replaced(m4a):
    async def body(pool: DecodePool):
        victim, decoding = await _stuck(pool, m4a)
        os.kill(victim, signal.SIGSEGV)  # delivered when it resumes: a decoder crash
        os.kill(victim, signal.SIGCONT)
        with pytest.raises(ApiError) as refused:
            await decoding
        assert refused.value.status == 415 and "failed" in refused.value.message
        assert pool.failures == 1
        assert (await pool.decode(m4a, LIMITS)).format == "M4A/AAC"
    _run(body)


def test_waiting_for_a_worker_is_bounded(m4a, monkeypatch):
    monkeypatch.setattr(decode_pool, "MAX_WAITING", 1)

    async def body(pool: DecodePool):
        _, hogging = await _stuck(pool, m4a, Limits(30, max_decode_s=1.0))
        waiting = asyncio.create_task(pool.decode(m4a, Limits(30, max_decode_s=0.3)))
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as no_room:  # the one waiting place is taken
            await pool.decode(m4a, LIMITS)
        with pytest.raises(ApiError) as too_long:  # waited its max_decode_s
            await waiting
        for refused in (no_room.value, too_long.value):
            assert (refused.status, refused.code) == (503, "overloaded")
            assert refused.headers["Retry-After"]
        with pytest.raises(ApiError):
            await hogging
        assert (await pool.decode(m4a, LIMITS)).format == "M4A/AAC"
    _run(body)


def test_an_abandoned_decode_does_not_keep_its_worker(m4a):
    async def body(pool: DecodePool):
        worker, decoding = await _stuck(pool, m4a)
        decoding.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await decoding
        assert _gone(worker) and pool.pids() == []
        assert (await pool.decode(m4a, LIMITS)).format == "M4A/AAC"
        (fresh,) = pool.pids()
        await pool.close()
        assert _gone(fresh)
    _run(body)


def test_workers_die_with_the_router(m4a, tmp_path):
    """A router killed without closing its pool leaves no worker behind."""
    clip = tmp_path / "clip.m4a"
    clip.write_bytes(m4a)
    script = ("import asyncio, os, sys\n"
              "from serve_app.audio.pool import DecodePool\n"
              "from serve_app.audio.waveform import Limits\n"
              "async def main():\n"
              "    pool = DecodePool(1)\n"
              f"    await pool.decode(open({str(clip)!r}, 'rb').read(), Limits(30))\n"
              "    print(*pool.pids(), flush=True)\n"
              "    os._exit(0)\n"
              "asyncio.run(main())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    worker = int(done.stdout)
    eventually(lambda: _gone(worker), f"worker {worker} gone", 10, interval_s=0.05)
