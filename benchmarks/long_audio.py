"""Peak memory and time of long clips, windowed (the default 30 s window) against one pass
over the whole clip, on the base architecture. Each measurement runs in a fresh process.

    python benchmarks/long_audio.py --lengths 10,30,60,120
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.results import add_results_dir, write_result
from serve_app.checkpoints import generate

CACHE = Path("~/.cache/emotion2vec-serve/checkpoints").expanduser()


def measure(directory: str, seconds: float, window_s: float, threads: int) -> dict:
    import numpy as np

    from serve_app.config import ModelSettings
    from serve_app.inference.engine import EmotionEngine

    engine = EmotionEngine(ModelSettings(source=directory, window_s=window_s), "cpu", threads)
    engine.load()
    engine.warmup()
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clip = (np.random.default_rng(0).standard_normal(int(seconds * 16_000)) * 0.1
            ).astype(np.float32)
    started = time.perf_counter()
    engine.predict(clip, "utterance", False)
    return {"s": time.perf_counter() - started,
            "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb) / 1024}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="10,30,60,120")
    parser.add_argument("--arch", default="base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    return add_results_dir(parser)


def main() -> None:
    args = _parser().parse_args()
    if args.measure:
        directory, seconds, window = args.measure
        print(json.dumps(measure(directory, float(seconds), float(window), args.threads)))
        return
    directory = generate.write_checkpoint(CACHE / f"{args.arch}-seed0", args.arch, 0)
    print(f"{args.arch}, {args.threads} threads; peak RSS added by one prediction")
    print(f"{'clip s':>6} {'windowed 30 s':>22} {'whole clip':>22}")
    rows = []
    for seconds in (float(s) for s in args.lengths.split(",")):
        cells, measured = [], []
        for window in (30.0, 600.0):
            out = subprocess.run([sys.executable, __file__, "--measure", str(directory),
                                  str(seconds), str(window), "--threads", str(args.threads)],
                                 capture_output=True, text=True, timeout=900, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            cells.append(f"{result['peak_mb']:7.0f} MB {result['s']:7.2f} s")
            measured.append((round(result["peak_mb"]), round(result["s"], 2)))
        print(f"{seconds:6.0f} {cells[0]:>22} {cells[1]:>22}")
        rows.append({"clip_s": seconds, "windowed_mb": measured[0][0],
                     "windowed_s": measured[0][1], "whole_mb": measured[1][0],
                     "whole_s": measured[1][1]})
    write_result("long-audio", {"benchmark": "long_audio", "arch": args.arch,
                                "threads": args.threads, "window_s": 30, "rows": rows},
                 results_dir=args.results_dir,
                 config=f"a generated random-weight {args.arch} checkpoint, {args.threads} "
                        "torch threads")


if __name__ == "__main__":
    main()
