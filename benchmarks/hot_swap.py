"""Hot swap under load: N clients send requests to one variant for about a minute while its
checkpoint is redeployed twice through the declarative path (`serve deploy`'s).

Prints requests sent and failed (the goal: 0 failed), p50/p99 latency before, during and after
the swaps, each swap's duration, and the replica's RSS before, during (two models for a
moment) and after. Starts its own Ray cluster on 127.0.0.1; every loop is bounded.

    python benchmarks/hot_swap.py --config configs/cpu.yaml --variant base --clients 4
"""

from __future__ import annotations

import argparse
import copy
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile

from benchmarks.results import add_results_dir, relative_config, write_result
from serve_app.checkpoints import generate
from serve_app.tools.cluster import load_app, local_serve

REPO = Path(__file__).resolve().parents[1]


def with_checkpoint(app: dict, variant: str, seed: int) -> dict:
    """The app with `variant` pointed at the generated checkpoint of another seed."""
    app = copy.deepcopy(app)
    for deployment in app["deployments"]:
        if deployment["name"] == variant:
            config = deployment["user_config"]
            arch = config["generate"]["arch"]
            source = Path(config["source"]).expanduser()
            config["source"] = str(source.with_name(f"{arch}-seed{seed}"))
            config["generate"] = {"arch": arch, "seed": seed}
    return app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    parser.add_argument("--variant", default="base")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clip-seconds", type=float, default=2.0)
    return add_results_dir(parser)


def main() -> None:
    args = _parser().parse_args()

    app = load_app(args.config)
    swapped = with_checkpoint(app, args.variant, seed=1)
    for deployment in swapped["deployments"]:  # generated up front: time the swap, not the write
        if deployment["name"] == args.variant:
            config = deployment["user_config"]
            generate.write_checkpoint(config["source"], config["generate"]["arch"], 1)

    t = np.arange(int(args.clip_seconds * 16_000)) / 16_000
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16_000,
                    format="WAV")
    wav = buffer.getvalue()

    with local_serve() as serve_handle:
        serve_handle.put(app)
        serve_handle.wait_for(app["name"], ("RUNNING",), timeout_s=900)
        url = serve_handle.url
        results: list[tuple[float, float, int]] = []  # (start, latency, status)
        rss: list[tuple[float, int]] = []
        stop = threading.Event()
        deadline = time.monotonic() + args.seconds + 120  # hard bound whatever happens

        def client() -> None:
            with httpx.Client(base_url=url, timeout=120) as http:
                while not stop.is_set() and time.monotonic() < deadline:
                    started = time.monotonic()
                    try:
                        status = http.post("/v1/predict", files={"file": ("c.wav", wav)},
                                           data={"model_version": args.variant}).status_code
                    except httpx.HTTPError:
                        status = 0
                    results.append((started, time.monotonic() - started, status))

        def variant_info() -> dict:
            return httpx.get(f"{url}/v1/models", timeout=30).json()["variants"][args.variant]

        def watch_rss() -> None:
            while not stop.is_set() and time.monotonic() < deadline:
                rss.append((time.monotonic(), variant_info()["rss_bytes"]))
                time.sleep(0.25)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        threads.append(threading.Thread(target=watch_rss))
        begin = time.monotonic()
        for thread in threads:
            thread.start()
        swaps = []
        try:
            for at, target in ((0.25, swapped), (0.6, app)):
                time.sleep(max(0.0, begin + at * args.seconds - time.monotonic()))
                loads = variant_info()["load_count"]
                swap_start = time.monotonic()
                serve_handle.put(target)
                while time.monotonic() < deadline:
                    info = variant_info()
                    if info["load_count"] > loads or (info["last_swap"] or {}).get(
                            "result") == "failed":
                        break
                    time.sleep(0.1)
                swaps.append((swap_start, time.monotonic(), info["last_swap"]))
            time.sleep(max(0.0, begin + args.seconds - time.monotonic()))
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=150)

    phases = []

    def phase(name: str, keep) -> None:
        latencies = [lat for start, lat, status in results if keep(start) and status == 200]
        if latencies:
            p50, p99 = (np.percentile(latencies, q) * 1000 for q in (50, 99))
            print(f"  {name:7} {len(latencies):5d} ok   p50 {p50:6.0f} ms   p99 {p99:6.0f} ms")
            phases.append({"phase": name, "ok": len(latencies), "p50_ms": round(p50),
                           "p99_ms": round(p99)})

    def during(moment: float) -> bool:
        return any(start <= moment <= end for start, end, _ in swaps)

    failed = [status for _, _, status in results if status != 200]
    print(f"\n{args.clients} clients, {args.seconds:g} s, {args.clip_seconds:g} s clips to "
          f"{args.variant} ({args.config})")
    print(f"requests sent {len(results)}, failed {len(failed)}"
          + (f" (statuses {sorted(set(failed))})" if failed else ""))
    phase("before", lambda s: s < swaps[0][0])
    phase("during", during)
    phase("between", lambda s: swaps[0][1] < s < swaps[1][0])
    phase("after", lambda s: s > swaps[1][1])
    for index, (start, end, last) in enumerate(swaps, 1):
        print(f"swap {index}: {last['result']}, load+warm-up {last['duration_s']:.2f} s in the "
              f"replica, {end - start:.2f} s from deploy to serving")
    before = [value for moment, value in rss if moment < swaps[0][0]]
    inside = [value for moment, value in rss if during(moment)]
    after = [value for moment, value in rss if moment > swaps[1][1] + 2]
    mb = 2**20
    print(f"replica RSS: before {np.median(before) / mb:.0f} MB, during swaps max "
          f"{max(inside, default=0) / mb:.0f} MB, after {np.median(after) / mb:.0f} MB")
    write_result("hot-swap", {
        "benchmark": "hot_swap", "variant": args.variant, "clients": args.clients,
        "seconds": args.seconds, "clip_s": args.clip_seconds, "sent": len(results),
        "failed": len(failed), "failed_statuses": sorted(set(failed)), "phases": phases,
        "swap_results": [last["result"] for _, _, last in swaps],
        "swap_replica_s": [round(last["duration_s"], 2) for _, _, last in swaps],
        "swap_deploy_s": [round(end - start, 2) for start, end, _ in swaps],
        "rss_mb": {"before": round(float(np.median(before)) / mb),
                   "during_max": round(max(inside, default=0) / mb),
                   "after": round(float(np.median(after)) / mb)}},
        results_dir=args.results_dir, config=relative_config(args.config))


if __name__ == "__main__":
    main()
