"""Cold start: time to a warm model and peak RSS while loading, per architecture and loader.

Each load runs in a fresh process; the peak is the process's high-water mark (VmHWM, restarted
after torch and FunASR are imported) above its RSS before the load. With the mmap loader the
weights are file-backed pages (shared with the page cache, and between replicas that map the
same file); the last column shows how much of the RSS they are. The checkpoint is read once first
so that the page cache is warm for every loader alike. With --optimizer-state the checkpoints
carry Adam's moments beside the weights, as the published files do (model.pt ~3x the weights).

    python -m benchmarks.cold_start --archs base,large [--optimizer-state]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.results import add_results_dir, write_result
from serve_app.checkpoints import generate

CACHE = Path("~/.cache/emotion2vec-serve/checkpoints").expanduser()


def measure(directory: str, loader: str, threads: int) -> dict:
    """In this (fresh) process: load, warm up, and report."""
    import funasr  # noqa: F401  (imported before the baseline, as a replica has it)
    import torch  # noqa: F401

    from serve_app.config import ModelSettings
    from serve_app.inference.engine import EmotionEngine

    before_mb = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from now
    started = time.perf_counter()
    engine = EmotionEngine(ModelSettings(source=directory, loader=loader), "cpu", threads)
    engine.load()
    loaded = time.perf_counter() - started
    engine.warmup()
    return {"load_s": loaded, "ready_s": time.perf_counter() - started,
            "peak_mb": _status_mb("VmHWM") - before_mb, "file_mb": _status_mb("RssFile")}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="base,large")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizer-state", action="store_true",
                        help="checkpoints with optimizer state beside the weights, as published")
    parser.add_argument("--measure", nargs=2, metavar=("DIR", "LOADER"), help=argparse.SUPPRESS)
    return add_results_dir(parser)


def main() -> None:
    args = _parser().parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.threads)))
        return
    print(f"{'arch':6} {'model.pt':>9} {'weights':>8} {'loader':7} {'load s':>7} {'ready s':>8} "
          f"{'peak RSS added':>15} {'x weights':>9} {'file-backed':>12}")
    rows = []
    for arch in args.archs.split(","):
        name = f"{arch}-seed0" + ("-optimizer" if args.optimizer_state else "")
        directory = generate.write_checkpoint(CACHE / name, arch, 0,
                                                 optimizer_state=args.optimizer_state)
        size_mb = (directory / "model.pt").stat().st_size / 2**20
        weights_mb = generate.random_weights_info(directory)["params"] * 4 / 2**20  # float32
        with open(directory / "model.pt", "rb") as handle:  # warm the page cache for both
            while handle.read(16 * 2**20):
                pass
        for loader in ("funasr", "mmap"):
            out = subprocess.run(
                [sys.executable, __file__, "--measure", str(directory), loader,
                 "--threads", str(args.threads)],
                capture_output=True, text=True, timeout=600, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{arch:6} {size_mb:8.0f}M {weights_mb:7.0f}M {loader:7} {result['load_s']:7.2f} "
                  f"{result['ready_s']:8.2f} {result['peak_mb']:14.0f}M "
                  f"{result['peak_mb'] / weights_mb:9.2f} {result['file_mb']:11.0f}M")
            rows.append({"arch": arch, "model_mb": round(size_mb), "weights_mb": round(weights_mb),
                         "loader": loader, "load_s": round(result["load_s"], 2),
                         "ready_s": round(result["ready_s"], 2),
                         "peak_added_mb": round(result["peak_mb"]),
                         "x_weights": round(result["peak_mb"] / weights_mb, 2),
                         "file_backed_mb": round(result["file_mb"]),
                         "optimizer_state": args.optimizer_state})
    write_result("cold-start", {"benchmark": "cold_start", "rows": rows},
                 results_dir=args.results_dir,
                 config=f"generated random-weight checkpoints ({args.archs}), {args.threads} "
                        "torch threads" + (", with optimizer state" if args.optimizer_state
                                           else ""))


if __name__ == "__main__":
    main()
