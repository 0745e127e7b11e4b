"""Live streams (WS /v1/stream) at real-time pace: the event lag at 1, 2, 4 and 8 concurrent
streams per variant, and the most streams a variant holds without skipping a window.

Lag is the client's: from sending the message that holds a window's last sample to receiving
that window's event (the service also records it, from arrival in the router, as
ray_emotion2vec_stream_event_lag_ms). A stream "holds" when no window of any stream was skipped
and none failed. Starts its own Ray cluster on 127.0.0.1 with the given config; every stage is
bounded in time, and the search for the most streams in count.

    python -m benchmarks.stream                                      # configs/cpu.yaml
    python -m benchmarks.stream --config configs/tiny.yaml --seconds 3 --variants base  # short
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np

from benchmarks.results import add_results_dir, relative_config, write_result
from serve_app.tools.cluster import load_app, local_serve
from serve_app.tools.stream_client import stream_audio

REPO = Path(__file__).resolve().parents[1]


def speech_like(seconds: float, rate: int, seed: int) -> np.ndarray:
    """A harmonic tone with vibrato and noise (inference cost does not depend on content)."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (150 + 20 * seed) * t + 3 * np.sin(2 * np.pi * 5 * t)
    noise = np.random.default_rng(seed).standard_normal(len(t)) * 0.02
    return (0.13 * sum(np.sin(k * phase) / k for k in range(1, 6)) + noise).astype(np.float32)


async def stage(url: str, variant: str, streams: int, seconds: float, rate: int,
                hop_s: float | None = None) -> dict:
    """`streams` concurrent real-time streams of `seconds` each (`hop_s`: the config's)."""
    runs = await asyncio.gather(*(
        stream_audio(url, speech_like(seconds, rate, i), rate, pace="realtime",
                     encoding="pcm_s16le", params={"model_version": variant, "hop_s": hop_s},
                     timeout_s=seconds + 120)
        for i in range(streams)), return_exceptions=True)
    lags = [w["lag_ms"] for run in runs if not isinstance(run, BaseException)
            for w in run.windows if "lag_ms" in w]
    failed = [run for run in runs if isinstance(run, BaseException) or run.result is None]
    return {
        "streams": streams,
        "windows": len(lags),
        "skipped": sum(run.skipped for run in runs if not isinstance(run, BaseException)),
        "failed": len(failed),
        "errors": sorted({str(run) if isinstance(run, BaseException) else
                          (run.error or {}).get("code", f"closed {run.close_code}")
                          for run in failed}),
        "p50": float(np.percentile(lags, 50)) if lags else float("nan"),
        "p99": float(np.percentile(lags, 99)) if lags else float("nan"),
    }


def holds(result: dict) -> bool:
    return result["skipped"] == 0 and result["failed"] == 0


def row(variant: str, result: dict) -> str:
    return (f"{variant:<8} {result['streams']:7d} {result['windows']:8d} {result['skipped']:8d} "
            f"{result['failed']:7d} {result['p50']:8.0f} {result['p99']:8.0f}"
            + (f"   {', '.join(result['errors'])}" if result["errors"] else ""))


async def most_streams(url: str, variant: str, seconds: float, rate: int, known: dict[int, dict],
                       limit: int, hop_s: float | None) -> str:
    """The largest count that holds ("at least" when the limit held): doubling past the known
    stages, then halving the gap."""
    good = max((n for n, r in known.items() if holds(r)), default=0)
    bad = min((n for n, r in known.items() if not holds(r)), default=None)
    while bad is None and good < limit:
        n = min(limit, good * 2 if good else 1)
        known[n] = await stage(url, variant, n, seconds, rate, hop_s)
        print(row(variant, known[n]), flush=True)
        good, bad = (n, bad) if holds(known[n]) else (good, n)
    for _ in range(3):  # at most three more stages
        if bad is None or bad - good <= 1:
            break
        n = (good + bad) // 2
        known[n] = await stage(url, variant, n, seconds, rate, hop_s)
        print(row(variant, known[n]), flush=True)
        good, bad = (n, bad) if holds(known[n]) else (good, n)
    return f"{good}" if bad is not None else f">= {good} (--max-streams)"


async def bench(url: str, args: argparse.Namespace) -> None:
    hop = f"every {args.hop:g} s" if args.hop else "every 0.5 s (the config's default)"
    print(f"{args.config}: {args.seconds:g} s real-time streams at {args.rate} Hz, 2 s windows "
          f"{hop}")
    print(f"{'variant':<8} {'streams':>7} {'windows':>8} {'skipped':>8} {'failed':>7} "
          f"{'p50 ms':>8} {'p99 ms':>8}")
    most: dict[str, str] = {}
    rows: list[dict] = []
    for variant in args.variants.split(","):
        await stage(url, variant, 1, min(args.seconds, 3.0), args.rate, args.hop)  # warm up
        known: dict[int, dict] = {}
        for streams in (int(n) for n in args.levels.split(",")):
            known[streams] = await stage(url, variant, streams, args.seconds, args.rate, args.hop)
            print(row(variant, known[streams]), flush=True)
        most[variant] = await most_streams(url, variant, args.seconds, args.rate, known,
                                           args.max_streams, args.hop)
        rows += [{"variant": variant, "streams": n, "windows": r["windows"],
                  "skipped": r["skipped"], "failed": r["failed"], "p50_ms": round(r["p50"]),
                  "p99_ms": round(r["p99"])} for n, r in sorted(known.items())]
    print("most real-time streams without a skipped window: " +
          ", ".join(f"{variant} {n}" for variant, n in most.items()))
    write_result("stream", {
        "benchmark": "stream",
        "stream": f"{args.seconds:g} s streams at real-time pace, 2 s windows "
                  f"every {args.hop or 0.5:g} s" + ("" if args.hop else " (the config's default)"),
        "rows": rows,
        "most_streams_without_skipping": {v: int(n) if n.isdigit() else n
                                          for v, n in most.items()}},
        results_dir=args.results_dir, config=relative_config(args.config))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    parser.add_argument("--variants", default="base,large,turbo")
    parser.add_argument("--levels", default="1,2,4,8", help="concurrent streams per stage")
    parser.add_argument("--seconds", type=float, default=20.0, help="audio per stream")
    parser.add_argument("--rate", type=int, default=16_000, help="the streams' sample rate")
    parser.add_argument("--hop", type=float, default=None,
                        help="seconds between windows (default: the config's stream_hop_s)")
    parser.add_argument("--max-streams", type=int, default=32,
                        help="stop looking for the most streams here")
    return add_results_dir(parser)


def main() -> None:
    args = _parser().parse_args()
    # Room for every stream the search may open; the stream limits otherwise as configured.
    app = load_app(args.config, max_streams=max(64, args.max_streams))
    with local_serve() as serve_handle:
        serve_handle.put(app)
        serve_handle.wait_for(app["name"], ("RUNNING",), timeout_s=900)
        asyncio.run(bench(serve_handle.url, args))


if __name__ == "__main__":
    main()
