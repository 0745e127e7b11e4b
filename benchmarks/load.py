"""Ramp concurrent clients against one variant past its capacity, and count what comes back.

The goal: no error but 503 (with Retry-After) however hard it is pushed, and a healthy service
afterwards. Starts its own Ray cluster on 127.0.0.1 with the given config; each stage is
bounded in time and count.

    python benchmarks/load.py --config configs/cpu.yaml --variant base --stages 1,4,16,64
"""

from __future__ import annotations

import argparse
import io
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import soundfile

from benchmarks.results import add_results_dir, relative_config, write_result
from serve_app.tools.cluster import load_app, local_serve

REPO = Path(__file__).resolve().parents[1]


def run_stage(url: str, variant: str, body: bytes, clients: int, seconds: float,
              filename: str = "c.wav") -> dict:
    """`clients` closed-loop clients posting `body` for `seconds`: every outcome, the latency
    and the service's decode time of each 200, and 503s that came without Retry-After."""
    outcomes: Counter = Counter()
    latencies: list[float] = []
    decodes: list[float] = []
    retry_after_missing = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        nonlocal retry_after_missing
        with httpx.Client(base_url=url, timeout=120) as http:
            for _ in range(10_000):  # bounded count as well as time
                if time.monotonic() >= deadline:
                    return
                started = time.monotonic()
                try:
                    response = http.post("/v1/predict", files={"file": (filename, body)},
                                         data={"model_version": variant})
                    status = response.status_code
                    missing = status == 503 and "retry-after" not in response.headers
                except httpx.HTTPError as exc:
                    status, missing = type(exc).__name__, False
                with lock:
                    outcomes[status] += 1
                    retry_after_missing += missing
                    if status == 200:
                        latencies.append(time.monotonic() - started)
                        decodes.append(response.json()["timings_ms"]["decode"])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 150)
    return {"outcomes": outcomes, "latencies": latencies, "decodes": decodes,
            "retry_after_missing": retry_after_missing}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    parser.add_argument("--variant", default="base")
    parser.add_argument("--stages", default="1,4,16,64", help="concurrent clients per stage")
    parser.add_argument("--stage-seconds", type=float, default=15.0)
    parser.add_argument("--clip-seconds", type=float, default=2.0)
    return add_results_dir(parser)


def main() -> None:
    args = _parser().parse_args()

    t = np.arange(int(args.clip_seconds * 16_000)) / 16_000
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16_000,
                    format="WAV")
    app = load_app(args.config)
    with local_serve() as serve_handle:
        serve_handle.put(app)
        serve_handle.wait_for(app["name"], ("RUNNING",), timeout_s=900)
        print(f"{args.variant} ({args.config}), {args.clip_seconds:g} s clips, "
              f"{args.stage_seconds:g} s per stage")
        print(f"{'clients':>7} {'sent':>6} {'ok':>6} {'503':>6} {'other':>6} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'ok/s':>6}")
        totals: Counter = Counter()
        rows = []
        for clients in (int(c) for c in args.stages.split(",")):
            stage = run_stage(serve_handle.url, args.variant, buffer.getvalue(), clients,
                              args.stage_seconds)
            outcomes, latencies = stage["outcomes"], stage["latencies"]
            totals.update(outcomes)
            other = sum(n for status, n in outcomes.items() if status not in (200, 503))
            p50, p99 = ((np.percentile(latencies, q) * 1000 for q in (50, 99)) if latencies
                        else (float("nan"),) * 2)
            print(f"{clients:7d} {sum(outcomes.values()):6d} {outcomes[200]:6d} "
                  f"{outcomes[503]:6d} {other:6d} {p50:8.0f} {p99:8.0f} "
                  f"{outcomes[200] / args.stage_seconds:6.1f}"
                  + (f"   others: {dict(outcomes)}" if other else "")
                  + (f"   503 without Retry-After: {stage['retry_after_missing']}"
                     if stage["retry_after_missing"] else ""))
            rows.append({"clients": clients, "sent": sum(outcomes.values()), "ok": outcomes[200],
                         "503": outcomes[503], "other": other,
                         "p50_ms": None if p50 != p50 else round(p50),
                         "p99_ms": None if p99 != p99 else round(p99),
                         "ok_per_s": round(outcomes[200] / args.stage_seconds, 1),
                         "retry_after_missing": stage["retry_after_missing"]})
        ready = httpx.get(f"{serve_handle.url}/ready", timeout=30)
        other = sum(n for status, n in totals.items() if status not in (200, 503))
        print(f"\ntotal sent {sum(totals.values())}, ok {totals[200]}, 503 {totals[503]}, "
              f"other errors {other}; /ready after: {ready.status_code} {ready.json()}")
    write_result("load", {"benchmark": "load", "variant": args.variant,
                          "clip_s": args.clip_seconds, "stage_s": args.stage_seconds,
                          "rows": rows, "ready_after": ready.status_code},
                 results_dir=args.results_dir, config=relative_config(args.config))


if __name__ == "__main__":
    main()
