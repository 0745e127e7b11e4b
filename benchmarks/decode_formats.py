"""Decoding cost per format, and what it does to the router's throughput.

1. In this process, a 5 s clip in each format (encoded here with PyAV, as the tests do):
   median decode time with libsndfile (where it reads the format), with FFmpeg in this
   thread, and with FFmpeg in a decode worker process (the router's way: the round trip
   through the pipe included).
2. Against a service it starts (its own Ray cluster on 127.0.0.1, configs/tiny.yaml by
   default, so that the model is not the bottleneck): 16 concurrent clients uploading the same
   5 s clip as wav, as m4a decoded in the workers, and as m4a decoded in the router's threads
   (decode_workers: 0), each for a fixed time: requests/s, latency and decode time.

    python -m benchmarks.decode_formats --reps 20 --stage-seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import time
from pathlib import Path

import numpy as np
import soundfile

from benchmarks.load import run_stage
from benchmarks.results import add_results_dir, relative_config, write_result
from serve_app.audio import ffmpeg, sndfile
from serve_app.audio.pool import DecodePool
from serve_app.audio.waveform import Limits
from serve_app.tools.cluster import load_app, local_serve
from tests import media

REPO = Path(__file__).resolve().parents[1]
SECONDS = 5.0
LIMITS = Limits(max_duration_s=120)


def clips() -> dict[str, bytes]:
    """name -> a 5 s clip: libsndfile's formats, then FFmpeg's."""
    out = {}
    for name, fmt, subtype, rate in [("wav 16k", "WAV", "PCM_16", 16_000),
                                     ("flac 44k", "FLAC", None, 44_100),
                                     ("ogg vorbis 22k", "OGG", "VORBIS", 22_050),
                                     ("mp3 48k", "MP3", "MPEG_LAYER_III", 48_000)]:
        buffer = io.BytesIO()
        soundfile.write(buffer, media.tone(SECONDS, rate)[0], rate, format=fmt, subtype=subtype)
        out[name] = buffer.getvalue()
    for name, (spec, _) in media.FORMATS.items():
        out[name] = media.encode(spec, SECONDS)
    return out


def _worker_cpu_s(pool: DecodePool) -> float:
    """User + system CPU time of the pool's (one) worker process so far."""
    (pid,) = pool.pids()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(run, reps: int, pool: DecodePool | None = None) -> tuple[float, float] | None:
    """(median wall ms, CPU ms per call: this process plus the worker), or None when
    libsndfile does not read the format. CPU time holds on a busy machine; wall time not."""
    times = []
    cpu_started = time.process_time() + (_worker_cpu_s(pool) if pool else 0.0)
    for _ in range(reps):
        started = time.perf_counter()
        try:
            run()
        except sndfile.NotLibsndfileAudio:
            return None
        times.append(time.perf_counter() - started)
    cpu = time.process_time() + (_worker_cpu_s(pool) if pool else 0.0) - cpu_started
    return statistics.median(times) * 1000, cpu / reps * 1000


def decode_table(reps: int) -> list[dict]:
    loop = asyncio.new_event_loop()
    pool = DecodePool(1)
    data = clips()
    loop.run_until_complete(pool.decode(data["m4a_aac"], LIMITS))  # start the worker
    print(f"Decode of a {SECONDS:g} s clip, ms: median wall time / CPU time per decode "
          f"({reps} each; a worker's CPU includes its own)")
    print(f"{'format':16} {'kB':>6} {'libsndfile':>13} {'FFmpeg, thread':>15} "
          f"{'FFmpeg, worker':>15} {'worker cost':>12}")

    def shown(result) -> str:
        return "-" if result is None else f"{result[0]:.1f} / {result[1]:.1f}"

    rows = []
    try:
        for name, body in data.items():
            libsndfile = measure(lambda body=body: sndfile.decode_sndfile(body, LIMITS), reps)
            thread = measure(lambda body=body: ffmpeg.decode(body, LIMITS), reps)
            worker = measure(lambda body=body: loop.run_until_complete(pool.decode(body, LIMITS)),
                             reps, pool)
            cost = f"{worker[0] - thread[0]:+.1f} / {worker[1] - thread[1]:+.1f}"
            print(f"{name:16} {len(body) / 1000:6.1f} {shown(libsndfile):>13} {shown(thread):>15} "
                  f"{shown(worker):>15} {cost:>12}")
            rows.append({"format": name, "kb": round(len(body) / 1000, 1),
                         **{key: None if value is None else [round(v, 1) for v in value]
                            for key, value in (("libsndfile", libsndfile), ("thread", thread),
                                               ("worker", worker))}})
    finally:
        loop.run_until_complete(pool.close())
        loop.close()
    return rows


def throughput_table(config: str, clients: int, seconds: float) -> list[dict]:
    wav = io.BytesIO()
    soundfile.write(wav, media.tone(SECONDS, 16_000)[0], 16_000, format="WAV")
    m4a = media.encode(media.FORMATS["m4a_aac"][0], SECONDS)
    app = load_app(config)
    router = next(d for d in app["deployments"] if d["name"] == "Router")

    def with_workers(count: int) -> dict:
        changed = {**router, "user_config": {**router["user_config"], "decode_workers": count}}
        return {**app, "deployments": [changed if d is router else d
                                       for d in app["deployments"]]}

    stages = [("wav", "clip.wav", wav.getvalue(), 2), ("m4a, workers", "clip.m4a", m4a, 2),
              ("m4a, thread", "clip.m4a", m4a, 0)]
    with local_serve() as serve_handle:
        print(f"\nRouter throughput: {clients} concurrent clients, {SECONDS:g} s clips, "
              f"{seconds:g} s per stage ({config}, variant base)")
        print(f"{'upload':14} {'ok':>6} {'other':>6} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'decode p50':>11}")
        rows = []
        for label, filename, body, workers in stages:
            serve_handle.put(with_workers(workers))
            serve_handle.wait_for(app["name"], ("RUNNING",), timeout_s=900)
            run_stage(serve_handle.url, "base", body, 2, 2.0, filename)  # warm-up
            stage = run_stage(serve_handle.url, "base", body, clients, seconds, filename)
            ok = stage["outcomes"][200]
            other = sum(stage["outcomes"].values()) - ok
            p50, p99 = ((np.percentile(stage["latencies"], q) * 1000 for q in (50, 99))
                        if ok else (float("nan"),) * 2)
            decode = statistics.median(stage["decodes"]) if ok else float("nan")
            print(f"{label:14} {ok:6d} {other:6d} {ok / seconds:7.1f} {p50:8.0f} {p99:8.0f} "
                  f"{decode:9.1f}ms" + (f"   {dict(stage['outcomes'])}" if other else ""))
            rows.append({"upload": label, "ok": ok, "other": other,
                         "req_per_s": round(ok / seconds, 1),
                         "p50_ms": round(p50) if ok else None,
                         "p99_ms": round(p99) if ok else None,
                         "decode_p50_ms": round(decode, 1) if ok else None})
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--stage-seconds", type=float, default=10.0)
    parser.add_argument("--skip-service", action="store_true", help="the decode table only")
    return add_results_dir(parser)


def main() -> None:
    args = _parser().parse_args()
    result = {"benchmark": "decode_formats", "clip_s": SECONDS, "reps": args.reps,
              "decode": decode_table(args.reps)}
    if not args.skip_service:
        result |= {"clients": args.clients,
                   "service": f"{SECONDS:g} s clips, {args.stage_seconds:g} s per stage, "
                              f"{relative_config(args.config)}'s base",
                   "throughput": throughput_table(args.config, args.clients, args.stage_seconds)}
    write_result("decode-formats", result, results_dir=args.results_dir,
                 config="in-process decoders" + ("" if args.skip_service
                                                 else f"; {relative_config(args.config)}"))


if __name__ == "__main__":
    main()
