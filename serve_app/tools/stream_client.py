"""The client side of WS /v1/stream, for the CLI and the benchmark: send audio at real-time
pace (or in lock-step with the windows), and collect the events with the lag the client sees
(from sending a window's last sample to receiving its event); and the CLI's stream command."""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from serve_app.api.stream_protocol import WindowSchedule

PACES = ("realtime", "lockstep")


@dataclass
class StreamRun:
    ready: dict | None = None
    windows: list[dict] = field(default_factory=list)  # each with the client's "lag_ms"
    utterances: list[dict] = field(default_factory=list)  # segments=true
    result: dict | None = None
    error: dict | None = None                           # the error event's "error"
    close_code: int | None = None

    @property
    def skipped(self) -> int:
        return sum(window.get("skipped", 0) for window in self.windows)


def stream_url(base_url: str, **params) -> str:
    """ws(s)://host/v1/stream?... from the service's http(s) URL."""
    query = urlencode({key: value for key, value in params.items() if value is not None})
    base = "ws" + base_url.rstrip("/")[4:] if base_url.startswith("http") else base_url
    return f"{base}/v1/stream" + (f"?{query}" if query else "")


def encode(samples: np.ndarray, encoding: str) -> bytes:
    if encoding == "f32le":
        return samples.astype("<f4").tobytes()
    clipped = np.clip(np.round(samples * 32768), -32768, 32767)
    return clipped.astype("<i2").tobytes()


async def stream_audio(url: str, samples: np.ndarray, rate: int, *, params: dict,
                       pace: str = "realtime", chunk_s: float = 0.1, encoding: str = "f32le",
                       timeout_s: float = 60.0, api_key: str | None = None,
                       on_event: Callable[[dict], None] | None = None) -> StreamRun:
    """Stream mono float32 `samples` at `rate` to `url` (the service's base URL), with
    `params` (model_version, window_s, hop_s); returns what came back. `lockstep` sends each
    window's audio once the previous window's event has arrived: as fast as the service
    answers, and no window is skipped. `api_key` goes in the Authorization header."""
    run = StreamRun()
    data = encode(samples, encoding)
    width = 4 if encoding == "f32le" else 2
    sent: list[tuple[int, float]] = []  # (samples sent so far, when), for the lag
    progress = asyncio.Condition()
    target = stream_url(url, sample_rate=rate, encoding=encoding, **params)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with connect(target, open_timeout=timeout_s, close_timeout=10,
                       max_size=2**24, additional_headers=headers) as ws:
        run.ready = json.loads(await asyncio.wait_for(ws.recv(), timeout_s))
        if on_event:
            on_event(run.ready)
        if run.ready["type"] != "ready":
            run.error = run.ready.get("error")
            return await _closed(ws, run)

        async def receive() -> None:
            try:
                async for message in ws:
                    event = json.loads(message)
                    if event["type"] == "window":
                        at = bisect.bisect_left([n for n, _ in sent],
                                                round(event["end_s"] * rate))
                        if at < len(sent):
                            event["lag_ms"] = round((time.perf_counter() - sent[at][1]) * 1000, 1)
                        run.windows.append(event)
                    elif event["type"] == "utterance":
                        run.utterances.append(event)
                    elif event["type"] == "result":
                        run.result = event
                    elif event["type"] == "error":
                        run.error = event["error"]
                    if on_event:
                        on_event(event)
                    async with progress:
                        progress.notify_all()
            except ConnectionClosed:
                pass
            async with progress:
                progress.notify_all()

        receiver = asyncio.create_task(receive())

        async def send(upto: int) -> None:
            start = sent[-1][0] if sent else 0
            if upto > start:
                await ws.send(data[start * width:upto * width])
                sent.append((upto, time.perf_counter()))

        def answered(k: int) -> bool:
            return (len(run.windows) + run.skipped >= k or run.error is not None
                    or receiver.done())

        try:
            total = len(samples)
            if pace == "lockstep":
                schedule = WindowSchedule(rate, run.ready["window_s"], run.ready["hop_s"])
                for k in range(1, schedule.windows_in(total) + 1):
                    await send(schedule.end_sample(k))
                    async with progress:
                        await asyncio.wait_for(progress.wait_for(lambda k=k: answered(k)),
                                               timeout_s)
                    if run.error is not None or receiver.done():
                        break
            else:
                chunk, began = max(1, int(chunk_s * rate)), time.perf_counter()
                for index, offset in enumerate(range(0, total, chunk)):
                    # Like a microphone: a chunk leaves once its last sample has been played.
                    await asyncio.sleep(max(0.0, began + (index + 1) * chunk_s
                                            - time.perf_counter()))
                    if run.error is not None or receiver.done():
                        break
                    await send(min(total, offset + chunk))
            if run.error is None and not receiver.done():
                await send(total)
                await ws.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            pass  # the server closed first: its error event says why
        await asyncio.wait_for(receiver, timeout_s)
        return await _closed(ws, run)


async def _closed(ws, run: StreamRun) -> StreamRun:
    try:
        await asyncio.wait_for(ws.wait_closed(), 10)
    except TimeoutError:
        pass
    run.close_code = ws.close_code
    return run


def format_event(event: dict) -> str | None:
    """One line for a person: a window, the result, or an error; None for the rest."""
    if event["type"] == "window":
        line = f"{event['start_s']:7.2f}-{event['end_s']:7.2f} s  " + (
            f"{'(no speech)':<16}" if event.get("speech") is False
            else f"{event['emotion']:<10} {event['confidence']:.3f}")
        if "lag_ms" in event:
            line += f"  lag {event['lag_ms']:.0f} ms"
        return line + (f"  ({event['skipped']} skipped)" if event.get("skipped") else "")
    if event["type"] == "ready":
        return (f"streaming to {event['model_version']}: {event['sample_rate']} Hz, "
                f"{event['window_s']:g} s windows every {event['hop_s']:g} s")
    if event["type"] == "result":
        return (f"result: {event['emotion']} {event['confidence']:.3f} over "
                f"{event['audio']['duration_s']:g} s ({event['model_version']}; "
                f"{event['windows']} windows, {event['skipped']} skipped"
                + (f", {event['silent']} without speech)" if "silent" in event else ")"))
    if event["type"] == "error":
        return f"error: {event['error']['code']}: {event['error']['message']}"
    return None


def stream_main(args: argparse.Namespace) -> int:
    """`emotion2vec-serve stream FILE`: the file decoded here, streamed, its events printed."""
    import soundfile

    try:
        samples, rate = soundfile.read(args.file, dtype="float32", always_2d=True)
        mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    except (RuntimeError, ValueError):  # not libsndfile's: FFmpeg, as the service decodes it
        from serve_app.audio import sndfile
        from serve_app.errors import ApiError

        try:
            decoded = sndfile.decode(Path(args.file).read_bytes(), max_duration_s=3600,
                                   min_duration_s=0.0)
        except ApiError as exc:
            print(f"error: cannot decode {args.file}: {exc.message}", file=sys.stderr)
            return 1
        mono, rate = decoded.waveform, sndfile.TARGET_SR

    def show(event: dict) -> None:
        line = json.dumps(event) if args.jsonl else format_event(event)
        if line is not None:
            print(line, flush=True)

    params = {"model_version": args.model_version, "window_s": args.window_s,
              "hop_s": args.hop_s, "labels": args.labels, "head": args.head,
              "vad": "true" if args.vad else None}
    try:
        run = asyncio.run(stream_audio(
            args.url, mono, int(rate), params=params, on_event=show,
            pace="lockstep" if args.fast else "realtime", chunk_s=args.chunk_s,
            timeout_s=args.timeout, api_key=args.api_key))
    except (OSError, TimeoutError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if run.result is None:
        if run.error is None:
            print(f"error: the stream closed with code {run.close_code} and no result",
                  file=sys.stderr)
        return 1
    return 0
