"""Batched vs clip-by-clip emotion2vec: how far apart the results are, and the time each takes.

In-process, no Ray. Loads one checkpoint (a random-weight base one is written if missing),
makes N clips of mixed lengths, and prints, per precision:
  - max abs difference, predict_batch vs predict on each clip alone: scores, utterance
    embeddings, frame embeddings (each clip's own frames);
  - median wall time of N sequential predict() calls vs one predict_batch() of the N clips.

    python benchmarks/batch_parity.py --checkpoint /tmp/e2v-batch/base0 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from serve_app.checkpoints import generate
from serve_app.config import ModelSettings
from serve_app.inference.engine import EmotionEngine, Prediction

RATE = 16_000


def mixed_clips(count: int, low_s: float, high_s: float, seed: int) -> list[np.ndarray]:
    """Tones plus noise, lengths spread over [low_s, high_s] and not multiples of 320."""
    rng = np.random.default_rng(seed)
    clips = []
    for i, seconds in enumerate(np.linspace(low_s, high_s, count)):
        n = int(seconds * RATE) + int(rng.integers(1, 320))
        t = np.arange(n) / RATE
        tone = 0.3 * np.sin(2 * np.pi * (120 + 40 * i) * t)
        clips.append((tone + 0.05 * rng.standard_normal(n)).astype(np.float32))
    rng.shuffle(clips)  # the batch is not sorted by length
    return clips


def max_abs(batched: list[Prediction], single: list[Prediction], field: str) -> float:
    return max(float(np.max(np.abs(np.subtract(getattr(b, field), getattr(s, field)))))
               for b, s in zip(batched, single))


def interleaved_times(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Wall times of each run, alternating them so that load from other processes on the
    machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def measure(checkpoint: Path, precision: str, clips: list[np.ndarray], threads: int,
            repeats: int) -> None:
    engine = EmotionEngine(ModelSettings(source=str(checkpoint), precision=precision),
                           "cpu", threads)
    engine.load()
    engine.warmup()
    single = {g: [engine.predict(c, g, True) for c in clips] for g in ("utterance", "frame")}
    batched = {g: engine.predict_batch(clips, g, True) for g in ("utterance", "frame")}
    for b, s in zip(batched["frame"], single["frame"]):
        assert b.embedding.shape == s.embedding.shape, (b.embedding.shape, s.embedding.shape)
    print(f"[{precision}] max abs diff, batched vs single: "
          f"scores {max_abs(batched['utterance'], single['utterance'], 'scores'):.3g}, "
          f"utterance emb {max_abs(batched['utterance'], single['utterance'], 'embedding'):.3g}, "
          f"frame emb {max_abs(batched['frame'], single['frame'], 'embedding'):.3g}")

    times = interleaved_times({
        "sequential": lambda: [engine.predict(c, "utterance", False) for c in clips],
        "batch": lambda: engine.predict_batch(clips, "utterance", False),
    }, repeats)
    sequential, one_batch = (statistics.median(times[k]) for k in ("sequential", "batch"))
    print(f"[{precision}] {len(clips)} x predict(): {sequential * 1000:.0f} ms; "
          f"predict_batch of {len(clips)}: {one_batch * 1000:.0f} ms "
          f"(median of {repeats}, interleaved, {threads} threads; "
          f"sequential/batch x{sequential / one_batch:.2f}); fastest: "
          f"{min(times['sequential']) * 1000:.0f} ms vs {min(times['batch']) * 1000:.0f} ms")
    # Other processes on the machine skew timings: say how busy it was.
    print(f"[{precision}] load average after: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/e2v-batch/base0"))
    parser.add_argument("--arch", default="base", help="written if the checkpoint is missing")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--min-s", type=float, default=2.0)
    parser.add_argument("--max-s", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", nargs="+", default=["fp32", "reduced"],
                        choices=["fp32", "reduced"])
    args = parser.parse_args()

    checkpoint = generate.write_checkpoint(args.checkpoint, args.arch, seed=0)
    clips = mixed_clips(args.clips, args.min_s, args.max_s, seed=0)
    print(f"{checkpoint} ({args.arch} if generated); clip lengths (s): "
          + ", ".join(f"{len(c) / RATE:.2f}" for c in clips))
    for precision in args.precision:
        measure(checkpoint, precision, clips, args.threads, args.repeats)


if __name__ == "__main__":
    main()
