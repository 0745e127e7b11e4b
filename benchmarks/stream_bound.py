"""Streams at their bound: per variant, the windows per second its engine computes in-process
on a stream window, the windows per second the service sustains over WS /v1/stream with the
variant saturated, their ratio (goal >= 0.85), and the real-time streams that makes.

In-process: an EmotionEngine with exactly the variant's settings from the config (its threads:
the variant's `threads`, else its CPU share rounded up, as the replica does) in a child process
of its own, predicting stream windows (the Router's stream_window_s of audio, one hop apart)
back to back. It runs while the cluster is up but idle, before the first served measurement
and after each (`--rounds`; the mean of these runs is the ratio's denominator, the mean of the
served runs its numerator), so the two sides share the machine's conditions and never compete.
Ray starts its workers, the replicas too, at niceness 15: on a machine other work keeps busy they
get less of it than a process at 0, so the engine is also measured at the replica's niceness
(`--replica-nice`), before the first served run and after the last.

Served: enough concurrent real-time streams that the variant always has a window waiting (each
stream has at most one window in flight; the rest are skipped, never queued), for a bounded
period after a warm-up; the service's rate is the window events with scores the streams
received in that period, per second. A stream needs 1 / hop_s windows a second, so the
real-time streams a variant holds is floor(served windows/s x hop_s); also stated at hop 1 s.
The replica's own forward time per window (its inference-latency metric over the period) is
recorded beside it, to tell a slower model in the replica from time the model spends idle.

    python -m benchmarks.stream_bound                                      # configs/cpu.yaml
    python -m benchmarks.stream_bound --config configs/tiny.yaml --variants base --period 8
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import re
import time
import urllib.request

import numpy as np

from benchmarks.results import add_results_dir, relative_config, write_result
from benchmarks.stream import REPO, speech_like
from serve_app.tools.cluster import load_app, local_serve
from serve_app.tools.stream_client import stream_audio

GOAL = 0.85
RATE = 16_000  # the streams' sample rate: windows reach the model as sent, no resampling


def variant_settings(app: dict, variant: str) -> tuple[dict, int]:
    """The variant's user_config from the app, and the threads its replica runs."""
    (deployment,) = [d for d in app["deployments"] if d["name"] == variant]
    user_config = deployment.get("user_config", {})
    num_cpus = app["args"]["variants"][variant].get("num_cpus", 1.0)
    threads = user_config.get("threads") or max(1, min(os.cpu_count() or 1, math.ceil(num_cpus)))
    return user_config, threads


def engine_rate(user_config: dict, threads: int, window_s: float, hop_s: float, count: int,
                max_s: float, nice: int) -> dict:
    """In a child process: load, warm up, then `count` windows back to back (at most max_s)."""
    from serve_app.config import ModelSettings
    from serve_app.inference.engine import EmotionEngine
    from serve_app.wire import Granularity

    if nice:
        os.nice(nice)
    engine = EmotionEngine(ModelSettings.model_validate(user_config), device="cpu",
                           threads=threads)
    info = engine.load()
    engine.warmup()
    size, step = int(window_s * RATE), int(hop_s * RATE)
    audio = speech_like(window_s + hop_s * count, RATE, 0)
    engine.predict(audio[:size], Granularity.UTTERANCE, False)  # this length's first call
    times: list[float] = []
    began, cpu_began = time.perf_counter(), time.process_time()
    for k in range(count):
        started = time.perf_counter()
        engine.predict(audio[k * step:k * step + size], Granularity.UTTERANCE, False)
        times.append(time.perf_counter() - started)
        if time.perf_counter() - began > max_s:
            break
    return {"windows": len(times), "per_s": len(times) / sum(times),
            "cores": (time.process_time() - cpu_began) / (time.perf_counter() - began),
            "p50_ms": float(np.median(times) * 1000), "backend": info.backend,
            "dtype": info.dtype, "threads": info.threads}


def in_process(app: dict, variant: str, args: argparse.Namespace, window_s: float,
               hop_s: float, nice: int) -> dict:
    """engine_rate in a fresh process (spawned: no Ray, no cluster memory), bounded in time."""
    user_config, threads = variant_settings(app, variant)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply_async(engine_rate, (user_config, threads, window_s, hop_s,
                                              args.windows, args.engine_s, nice)
                                ).get(timeout=900)


def replica_forward(metrics_url: str, variant: str) -> tuple[float, float]:
    """(sum of ms, count) of the variant's forward passes so far, from Ray's metrics."""
    try:
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    except OSError:
        return math.nan, math.nan
    found = {}
    for part in ("sum", "count"):
        pattern = rf'^ray_emotion2vec_inference_latency_ms_{part}\{{[^}}]*variant="{variant}"' \
                  r'[^}]*\} ([0-9.e+-]+)$'
        values = [float(v) for v in re.findall(pattern, text, re.M)]
        found[part] = sum(values) if values else math.nan
    return found["sum"], found["count"]


def cpu_seconds(variant: str) -> dict[str, float]:
    """CPU seconds so far, by role: this process (the streams' client), the cluster's proxy,
    Router and the variant's replica, the cluster's other processes, and the whole machine."""
    import psutil

    roles = dict.fromkeys(("client", "proxy", "router", "replica", "cluster"), 0.0)
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            title = " ".join(process.cmdline()[:1])
            times = process.cpu_times()
        except psutil.Error:
            continue
        role = ("client" if process.pid == me.pid else "proxy" if "ProxyActor" in title
                else "router" if re.match(r"ray::ServeReplica:[^:]+:Router\b", title)
                else "replica" if re.match(rf"ray::ServeReplica:[^:]+:{variant}(\.|$)", title)
                else "cluster")
        roles[role] += times.user + times.system
    machine = psutil.cpu_times()
    roles["machine"] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0) \
        - getattr(machine, "guest", 0.0) - getattr(machine, "guest_nice", 0.0)
    return roles


def cores(before: dict[str, float], after: dict[str, float], seconds: float) -> dict:
    used = {role: (after[role] - before[role]) / seconds for role in after}
    machine = used.pop("machine")
    return {**used, "others": machine - sum(used.values())}


async def served_rate(url: str, metrics_url: str, variant: str, streams: int, hop_s: float,
                      warmup_s: float, period_s: float) -> dict:
    """`streams` real-time streams; window events with scores received per second over
    [warm-up, warm-up + period]; every stream is then dropped (no end: no whole-stream
    result is computed)."""
    events: list[tuple[float, dict]] = []

    def on_event(event: dict) -> None:
        if event["type"] == "window":
            events.append((time.perf_counter(), event))

    seconds = warmup_s + period_s + 5  # audio left over when the period ends
    began = time.perf_counter()
    tasks = [asyncio.create_task(stream_audio(
        url, speech_like(seconds, RATE, i), RATE, pace="realtime", encoding="pcm_s16le",
        params={"model_version": variant, "hop_s": hop_s}, timeout_s=seconds + 60,
        on_event=on_event)) for i in range(streams)]
    await asyncio.wait(tasks, timeout=warmup_s)
    forward_before, cpu_before = replica_forward(metrics_url, variant), cpu_seconds(variant)
    await asyncio.wait(tasks, timeout=max(0.0, began + warmup_s + period_s - time.perf_counter()))
    ended = time.perf_counter()
    cpu_after, forward_after = cpu_seconds(variant), replica_forward(metrics_url, variant)
    ended_early = [task for task in tasks if task.done()]  # a stream that ended: it failed
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    errors = sorted({str(task.exception() or (task.result().error or {}).get("code"))
                     for task in ended_early if not task.cancelled()})
    start = began + warmup_s
    timed = [event for at, event in events if start <= at <= ended and "scores" in event]
    ms, passes = (after - before for after, before in zip(forward_after, forward_before))
    return {"streams": streams, "period_s": round(ended - start, 2), "windows": len(timed),
            "per_s": len(timed) / (ended - start),
            "skipped": sum(event.get("skipped", 0) for event in timed),
            "lag_p50_ms": float(np.median([e["lag_ms"] for e in timed if "lag_ms" in e]))
            if timed else math.nan,
            "replica_ms": ms / passes if passes else math.nan,
            # Cores each role used over the period; "others": processes not of this run.
            "cores": cores(cpu_before, cpu_after, ended - start),
            "failed": len(ended_early), "errors": errors}


def rounded(value: float, digits: int | None = None) -> float | int | None:
    """A number for the JSON: None where nothing was measured (NaN)."""
    return None if math.isnan(value) else round(value, digits)


def bound_row(variant: str, inner: list[dict], served: list[dict], hop_s: float,
              niced: list[dict]) -> dict:
    """One variant's line: the means of its in-process runs and of its served runs (and of the
    in-process runs at the replica's niceness)."""
    engine = float(np.mean([run["per_s"] for run in inner]))
    at_nice = float(np.mean([run["per_s"] for run in niced])) if niced else math.nan
    rate = float(np.mean([run["per_s"] for run in served]))
    replica_ms = float(np.nanmean([run["replica_ms"] for run in served]))
    return {"variant": variant, "backend": inner[0]["backend"], "dtype": inner[0]["dtype"],
            "threads": inner[0]["threads"],
            "engine_ms": round(float(np.mean([run["p50_ms"] for run in inner])), 1),
            "engine_per_s": round(engine, 2),
            "engine_runs": [round(run["per_s"], 2) for run in inner],
            # Cores the engine used while it ran (its process's CPU time over the wall time).
            "engine_cores": round(float(np.mean([run["cores"] for run in inner])), 2),
            "streams": served[0]["streams"], "served_per_s": round(rate, 2),
            "served_runs": [round(run["per_s"], 2) for run in served],
            "ratio": round(rate / engine, 3),
            "engine_niced_per_s": rounded(at_nice, 2),
            "engine_niced_runs": [round(run["per_s"], 2) for run in niced],
            "ratio_niced": rounded(rate / at_nice, 3),
            # The variant's forward time per window while served, and the share of the wall
            # time it spent computing the windows counted (1: never idle).
            "replica_ms": rounded(replica_ms, 1),
            "replica_busy": rounded(rate * replica_ms / 1000, 2),
            "lag_p50_ms": rounded(float(np.mean([run["lag_p50_ms"] for run in served]))),
            # Cores used over the served periods: the variant's replica; the stream path
            # (the proxy, the Router and the streams' client); processes outside this run.
            "replica_cores": round(float(np.mean([r["cores"]["replica"] for r in served])), 2),
            "path_cores": round(float(np.mean([r["cores"]["proxy"] + r["cores"]["router"]
                                               + r["cores"]["client"] for r in served])), 2),
            "others_cores": round(float(np.mean([r["cores"]["others"] for r in served])), 2),
            # Ray's other processes of the run (GCS, raylet, controller, the idle replicas).
            "ray_cores": round(float(np.mean([r["cores"]["cluster"] for r in served])), 2),
            "windows": sum(run["windows"] for run in served),
            "failed": sum(run["failed"] for run in served),
            "errors": sorted({error for run in served for error in run["errors"]}),
            "realtime_streams": math.floor(rate * hop_s + 1e-9),
            "realtime_streams_hop1": math.floor(rate + 1e-9)}


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def bench(serve_handle, app: dict, args: argparse.Namespace) -> None:
    router = next(d for d in app["deployments"] if d["name"] == "Router").get("user_config", {})
    window_s, hop_s = router.get("stream_window_s", 2.0), args.hop or router.get("stream_hop_s",
                                                                                0.5)
    print(f"{args.config}: {window_s:g} s windows every {hop_s:g} s; in-process "
          f"{args.windows} windows back to back (before and after); served: real-time streams, "
          f"{args.warmup:g} s warm-up, {args.period:g} s counted")
    rows, loads = [], [load_average()]
    for variant in args.variants.split(","):
        inner = [in_process(app, variant, args, window_s, hop_s, args.nice)]
        niced = [in_process(app, variant, args, window_s, hop_s, args.replica_nice)
                 ] if args.replica_nice else []
        streams = args.streams or min(args.max_streams,
                                      max(3, math.ceil(2 * inner[0]["per_s"] * hop_s)))
        asyncio.run(served_rate(serve_handle.url, serve_handle.metrics_url, variant,
                                min(streams, 3), hop_s, 3.0, 2.0))  # the router's first streams
        served = []
        for _ in range(args.rounds):  # in-process, then served and in-process again, in turn
            served.append(asyncio.run(served_rate(serve_handle.url, serve_handle.metrics_url,
                                                  variant, streams, hop_s, args.warmup,
                                                  args.period)))
            inner.append(in_process(app, variant, args, window_s, hop_s, args.nice))
        if args.replica_nice:
            niced.append(in_process(app, variant, args, window_s, hop_s, args.replica_nice))
        loads.append(load_average())
        rows.append(bound_row(variant, inner, served, hop_s, niced))
        row = rows[-1]
        print(f"{variant:<6} {row['backend']} {row['dtype']} {row['threads']} threads: in-process "
              f"{row['engine_per_s']:.2f}/s {row['engine_runs']} ({row['engine_ms']:.0f} ms), "
              f"served {row['served_per_s']:.2f}/s {row['served_runs']} over {row['streams']} "
              f"streams ({row['windows']} windows, replica {row['replica_ms']} ms/window, busy "
              f"{row['replica_busy']}, in-process at nice {args.replica_nice} "
              f"{row['engine_niced_per_s']} {row['engine_niced_runs']}, ratio to it "
              f"{row['ratio_niced']}, cores: replica {row['replica_cores']}, stream path "
              f"{row['path_cores']}, Ray {row['ray_cores']}, others {row['others_cores']}, "
              f"in-process {row['engine_cores']}; lag p50 "
              f"{row['lag_p50_ms']} ms, failed {row['failed']} "
              f"{row['errors']}), ratio {row['ratio']}: {row['realtime_streams']} real-time "
              f"streams at hop {hop_s:g} s, {row['realtime_streams_hop1']} at 1 s; load average "
              f"{loads[-1]}", flush=True)
    write_result("stream-bound", {
        "benchmark": "stream_bound", "window_s": window_s, "hop_s": hop_s, "goal": GOAL,
        "rounds": args.rounds,
        "engine_windows": args.windows, "engine_s": args.engine_s, "engine_nice": args.nice,
        "replica_nice": args.replica_nice, "warmup_s": args.warmup,
        "period_s": args.period, "load_average": loads, "rows": rows},
        results_dir=args.results_dir, config=relative_config(args.config))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    parser.add_argument("--variants", default="base,large,turbo")
    parser.add_argument("--hop", type=float, default=None,
                        help="seconds between windows (default: the config's stream_hop_s)")
    parser.add_argument("--streams", type=int, default=None,
                        help="concurrent streams (default: twice what the engine keeps up with, "
                             "at least 3, at most --max-streams)")
    parser.add_argument("--max-streams", type=int, default=12)
    parser.add_argument("--windows", type=int, default=200,
                        help="in-process windows per measurement, at most --engine-s seconds")
    parser.add_argument("--engine-s", type=float, default=20.0,
                        help="seconds per in-process measurement: long enough to average the "
                             "machine's other load as the served period does")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness added to the in-process child (Ray's workers run at 15)")
    parser.add_argument("--replica-nice", type=int, default=15,
                        help="also measure in-process at this niceness (Ray starts its workers, "
                             "the replicas too, at 15; RAY_worker_niceness), before the first "
                             "served run and after the last; 0: not")
    parser.add_argument("--rounds", type=int, default=2,
                        help="served runs per variant, each followed by an in-process run")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds not counted")
    parser.add_argument("--period", type=float, default=30.0, help="seconds counted")
    return add_results_dir(parser)


def main() -> None:
    args = _parser().parse_args()
    # Streams as long as the warm-up and period need (a stream's audio is also a predict).
    seconds = args.warmup + args.period + 10
    app = load_app(args.config, max_streams=64, stream_max_s=seconds,
                   stream_max_session_s=seconds + 60)
    router = next(d for d in app["deployments"] if d["name"] == "Router")["user_config"]
    router["max_duration_s"] = max(router.get("max_duration_s", 120.0), seconds)
    with local_serve() as serve_handle:
        serve_handle.put(app)
        serve_handle.wait_for(app["name"], ("RUNNING",), timeout_s=900)
        bench(serve_handle, app, args)


if __name__ == "__main__":
    main()
