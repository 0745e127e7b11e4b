"""What a shadow costs the primary: p50/p99 of the primary's latency over HTTP with and without
a shadow variant, side by side in one run.

Starts its own Ray cluster on 127.0.0.1 and deploys, from a config (default configs/cpu.yaml),
its `large` variant and a copy of it, `large_ft`, on another generated checkpoint (the next
seed: a stand-in for a fine-tuned one; written on first use). Then, in interleaved rounds,
sends sequential requests to large with the Router's `shadow` off, then `{large: large_ft}`,
switching by redeploying the Router's user_config (in place, as `serve deploy` does). Between
rounds it waits until every shadow call has finished. Prints both latencies and the shadow's
own counts (compared, dropped, errors, agreement).

    python -m benchmarks.shadow --config configs/cpu.yaml --requests 20 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.results import add_results_dir, relative_config, write_result
from benchmarks.serve_latency import http_latencies, percentile, speech_clip, wav_bytes
from serve_app.tools.cluster import LocalServe, load_app, local_serve

REPO = Path(__file__).resolve().parents[1]
PRIMARY, SHADOW = "large", "large_ft"


def shadowed_app(config: str) -> dict:
    """The config's app with only the primary and a copy of it on the next seed."""
    app = load_app(config)
    deployments = {d["name"]: d for d in app["deployments"]}
    primary = deployments[PRIMARY]
    generate = primary["user_config"].get("generate")
    if not generate:
        raise SystemExit(f"{config}: {PRIMARY} needs a generated checkpoint (generate:)")
    seed = generate.get("seed", 0) + 1
    source = Path(primary["user_config"]["source"]).expanduser()
    copy_config = {**primary["user_config"], "generate": {**generate, "seed": seed},
                   "source": str(source.parent / f"{generate['arch']}-seed{seed}")}
    app["args"]["variants"] = dict.fromkeys((PRIMARY, SHADOW), app["args"]["variants"][PRIMARY])
    router = copy.deepcopy(deployments["Router"])
    router["user_config"].update(default_version=PRIMARY, aliases={}, shadow={})
    app["deployments"] = [router, primary, {**copy.deepcopy(primary), "name": SHADOW,
                                            "user_config": copy_config}]
    return app


def set_shadow(serve: LocalServe, app: dict, on: bool) -> None:
    router = next(d for d in app["deployments"] if d["name"] == "Router")
    router["user_config"]["shadow"] = {PRIMARY: SHADOW} if on else {}
    serve.put(app)
    deadline = time.monotonic() + 60
    while (PRIMARY in rollouts(serve)["shadow"]) != on:
        if time.monotonic() > deadline:
            raise SystemExit("the router never took the shadow setting")
        time.sleep(0.2)


def rollouts(serve: LocalServe) -> dict:
    return httpx.get(f"{serve.url}/v1/rollouts", timeout=30).json()


def drain(serve: LocalServe, sent: int, timeout_s: float = 300) -> dict:
    """The shadow's stats once all `sent` shadow calls have finished (or been dropped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = rollouts(serve)["shadow"][PRIMARY]
        if stats["compared"] + stats["errors"] + stats["dropped"] >= sent:
            return stats
        if time.monotonic() > deadline:
            raise SystemExit(f"shadow calls still pending after {timeout_s} s: {stats}")
        time.sleep(0.2)


def interleaved_parser(doc: str) -> argparse.ArgumentParser:
    """The flags of a benchmark that compares modes in interleaved rounds of sequential
    requests (this one, benchmarks/heads.py)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    parser.add_argument("--requests", type=int, default=20, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clip-seconds", type=float, default=5.0)
    return add_results_dir(parser)


def _parser() -> argparse.ArgumentParser:
    return interleaved_parser(__doc__)


def main() -> None:
    args = _parser().parse_args()

    app = shadowed_app(args.config)
    wav = wav_bytes(speech_clip(args.clip_seconds))
    latencies: dict[bool, list[float]] = {False: [], True: []}
    totals = {"compared": 0, "dropped": 0, "errors": 0, "agreed": 0.0, "max_diff": 0.0}
    with local_serve() as serve:
        serve.put(app)
        status = serve.wait_for(app["name"], ("RUNNING", "DEPLOY_FAILED"), timeout_s=900)
        if status.status != "RUNNING":
            raise SystemExit(f"deploy failed: {status}")
        for _ in range(args.rounds):
            for on in (False, True):
                set_shadow(serve, app, on)
                # Any failed request stops the run (raise_for_status).
                latencies[on] += http_latencies(serve.url, PRIMARY, wav, args.requests)
                if on:
                    stats = drain(serve, args.requests + 2)  # with the two warm-ups
                    for key in ("compared", "dropped", "errors"):
                        totals[key] += stats[key]
                    totals["agreed"] += (stats["top1_agreement"] or 0) * stats["compared"]
                    totals["max_diff"] = max(totals["max_diff"], stats["max_abs_score_diff"] or 0)
    print(f"\n{args.config}: primary {PRIMARY}, shadow {SHADOW} (another generated checkpoint);"
          f" clip {args.clip_seconds:g} s; {args.rounds} interleaved rounds of "
          f"{args.requests} sequential requests per mode\n")
    print(f"{'mode':12} {'requests':>8} {'p50':>9} {'p99':>9}   (every request answered 200)")
    modes = []
    for on, label in ((False, "no shadow"), (True, "shadow")):
        times = latencies[on]
        print(f"{label:12} {len(times):8d} {np.median(times) * 1000:7.0f}ms "
              f"{percentile(times, 99) * 1000:7.0f}ms")
        modes.append({"mode": label, "requests": len(times),
                      "p50_ms": round(float(np.median(times)) * 1000),
                      "p99_ms": round(percentile(times, 99) * 1000)})
    print(f"shadow/no shadow: p50 {np.median(latencies[True]) / np.median(latencies[False]):.2f}"
          f", p99 {percentile(latencies[True], 99) / percentile(latencies[False], 99):.2f}")
    compared = totals["compared"]
    print(f"shadow calls: compared {compared}, dropped {totals['dropped']}, errors "
          f"{totals['errors']}; top-1 agreement "
          f"{totals['agreed'] / compared if compared else float('nan'):.2f}, largest score "
          f"difference {totals['max_diff']:.4f}")
    write_result("shadow", {
        "benchmark": "shadow", "primary": PRIMARY, "shadow": SHADOW,
        "clip_s": args.clip_seconds, "rounds": args.rounds, "requests": args.requests,
        "modes": modes,
        "p50_ratio": round(float(np.median(latencies[True]) / np.median(latencies[False])), 2),
        "p99_ratio": round(percentile(latencies[True], 99) / percentile(latencies[False], 99), 2),
        "compared": compared, "dropped": totals["dropped"], "errors": totals["errors"],
        "top1_agreement": round(totals["agreed"] / compared, 2) if compared else None,
        "max_score_diff": round(totals["max_diff"], 4)},
        results_dir=args.results_dir, config=relative_config(args.config))


if __name__ == "__main__":
    main()
