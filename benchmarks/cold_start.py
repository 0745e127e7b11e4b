"""Cold start: time to a warm model and peak RSS while loading, per architecture and loader.

Each load runs in a fresh process; the peak is the process's high-water mark (VmHWM, restarted
after torch and FunASR are imported) above its RSS before the load. With the mmap loader the
weights are file-backed pages (shared with the page cache, and between replicas that map the
same file); the last column shows how much of the RSS they are. The checkpoint is read once first
so that the page cache is warm for every loader alike.

    python benchmarks/cold_start.py --archs base,large
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from serve_app import checkpoints

CACHE = Path("~/.cache/emotion2vec-serve/checkpoints").expanduser()


def measure(directory: str, loader: str, threads: int) -> dict:
    """In this (fresh) process: load, warm up, and report."""
    import funasr  # noqa: F401  (imported before the baseline, as a replica has it)
    import torch  # noqa: F401

    from serve_app.config import ModelSettings
    from serve_app.engine import EmotionEngine

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="base,large")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", nargs=2, metavar=("DIR", "LOADER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.threads)))
        return
    print(f"{'arch':6} {'model.pt':>9} {'loader':7} {'load s':>7} {'ready s':>8} "
          f"{'peak RSS added':>15} {'x model.pt':>10} {'file-backed':>12}")
    for arch in args.archs.split(","):
        directory = checkpoints.write_checkpoint(CACHE / f"{arch}-seed0", arch, 0)
        size_mb = (directory / "model.pt").stat().st_size / 2**20
        (directory / "model.pt").read_bytes()  # warm the page cache for both loaders alike
        for loader in ("funasr", "mmap"):
            out = subprocess.run(
                [sys.executable, __file__, "--measure", str(directory), loader,
                 "--threads", str(args.threads)],
                capture_output=True, text=True, timeout=600, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{arch:6} {size_mb:8.0f}M {loader:7} {result['load_s']:7.2f} "
                  f"{result['ready_s']:8.2f} {result['peak_mb']:14.0f}M "
                  f"{result['peak_mb'] / size_mb:10.2f} {result['file_mb']:11.0f}M")


if __name__ == "__main__":
    main()
