"""What a custom head costs: p50/p99 over HTTP of plain predict, predict with one head, and
predict cycling over 100 heads (each request another head, more than a replica keeps
resident when --resident is below 100), side by side in interleaved rounds of one run.

Starts its own Ray cluster on 127.0.0.1 and deploys, from a config (default configs/cpu.yaml),
its `base` variant alone behind the Router, with heads_dir in a temporary folder. Registers
100 linear heads of 3 labels for base's checkpoint over PUT /v1/heads (random weights: the
cost of a head does not depend on what it learned), then sends sequential requests of a 5 s
speech clip in each mode.

    python -m benchmarks.heads --config configs/cpu.yaml --requests 20 --rounds 3
"""

from __future__ import annotations

import copy
import itertools
import tempfile

import httpx
import numpy as np

from benchmarks.results import relative_config, write_result
from benchmarks.serve_latency import http_latencies, percentile, speech_clip, wav_bytes
from benchmarks.shadow import interleaved_parser
from serve_app.heads import headfile
from serve_app.tools.cluster import load_app, local_serve

VARIANT = "base"
HEADS = 100
MODES = ("plain", "one head", f"{HEADS} heads cycling")


def heads_app(config: str, heads_dir: str, resident: int) -> dict:
    """The config's app with only the Router and `base`, heads kept in `heads_dir`."""
    app = load_app(config)
    deployments = {d["name"]: d for d in app["deployments"]}
    app["args"]["variants"] = {VARIANT: app["args"]["variants"][VARIANT]}
    app["args"]["vad_num_cpus"] = None
    router = copy.deepcopy(deployments["Router"])
    router["user_config"].update(default_version=VARIANT, aliases={}, shadow={},
                                 heads_dir=heads_dir)
    variant = copy.deepcopy(deployments[VARIANT])
    variant["user_config"]["max_resident_heads"] = resident
    app["deployments"] = [router, variant]
    return app


def head_file(name: str, sha256: str, dim: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    tensors = {"mean": rng.normal(size=dim) * 0.1, "scale": np.abs(rng.normal(size=dim)) + 0.5,
               "weight": rng.normal(size=(3, dim)) * 0.05, "bias": rng.normal(size=3)}
    labels = ["satisfied", "neutral", "frustrated"]
    return headfile.encode({"name": name, "kind": "linear", "labels": labels,
                            "embedding_dim": dim, "temperature": 1.0,
                            "backbone": {"arch": "benchmark", "sha256": sha256,
                                         "embedding_dim": dim}}, tensors)


def _parser():
    parser = interleaved_parser(__doc__)
    parser.add_argument("--resident", type=int, default=256,
                        help="the variant's max_resident_heads")
    return parser


def main() -> None:
    args = _parser().parse_args()
    wav = wav_bytes(speech_clip(args.clip_seconds))
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="e2v-heads-") as heads_dir, local_serve() as serve:
        app = heads_app(args.config, heads_dir, args.resident)
        serve.put(app)
        status = serve.wait_for(app["name"], ("RUNNING", "DEPLOY_FAILED"), timeout_s=900)
        if status.status != "RUNNING":
            raise SystemExit(f"deploy failed: {status}")
        with httpx.Client(base_url=serve.url, timeout=120) as client:
            info = client.get("/v1/models").json()["variants"][VARIANT]
            names = [f"head-{i:03d}" for i in range(HEADS)]
            for seed, name in enumerate(names):
                data = head_file(name, info["sha256"], info["embedding_dim"], seed)
                client.put(f"/v1/heads/{name}", content=data).raise_for_status()
            # Cycling goes on across rounds: every head is asked for in turn.
            plans = {MODES[0]: itertools.repeat({}),
                     MODES[1]: itertools.repeat({"head": names[0]}),
                     MODES[2]: itertools.cycle({"head": name} for name in names)}
            for _ in range(args.rounds):
                for mode in MODES:
                    times[mode] += http_latencies(serve.url, VARIANT, wav, args.requests,
                                                  plans[mode])
            resident = client.get("/v1/models").json()["variants"][VARIANT]["heads"]
    print(f"\n{args.config}: {VARIANT}, clip {args.clip_seconds:g} s; {args.rounds} interleaved "
          f"rounds of {args.requests} sequential requests per mode; max_resident_heads "
          f"{args.resident}; head files read by the replica: {resident['loads']}\n")
    print(f"{'mode':18} {'requests':>8} {'p50':>9} {'p99':>9}   p50 / plain")
    plain = float(np.median(times[MODES[0]]))
    rows = []
    for mode in MODES:
        p50, p99 = float(np.median(times[mode])), percentile(times[mode], 99)
        print(f"{mode:18} {len(times[mode]):8d} {p50 * 1000:7.0f}ms {p99 * 1000:7.0f}ms   "
              f"{p50 / plain:.3f}")
        rows.append({"mode": mode, "requests": len(times[mode]), "p50_ms": round(p50 * 1000, 1),
                     "p99_ms": round(p99 * 1000, 1), "p50_ratio": round(p50 / plain, 3)})
    cycling = float(np.median(times[MODES[2]])) / float(np.median(times[MODES[1]]))
    print(f"{MODES[2]} / one head: p50 {cycling:.3f}")
    write_result("heads", {
        "benchmark": "heads", "variant": VARIANT, "clip_s": args.clip_seconds,
        "rounds": args.rounds, "requests": args.requests, "heads": HEADS,
        "max_resident_heads": args.resident, "head_file_loads": resident["loads"],
        "modes": rows, "cycling_over_one_head_p50": round(cycling, 3)},
        results_dir=args.results_dir, config=relative_config(args.config))


if __name__ == "__main__":
    main()
