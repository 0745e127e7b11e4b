"""The production shape on one GPU, engine level: base, large (fp32) and turbo (large, fp16).

FunASR's Emotion2vec runs through this project's engine (serve_app/inference/engine.py) on
random-weight checkpoints of the published architectures, written here by
serve_app/checkpoints/generate.py. No Ray, no audio decoding: synthetic 16 kHz clips go
straight to the engine. For each variant:
  - load time (the engine's own: build, map model.pt, move to the device) and first prediction;
  - GPU memory: allocated and reserved after load, and the peak over all the measurements;
  - latency p50/p99 of single clips of 1, 5 and 30 s (the model resident, after warm-up);
  - throughput of padded batches (predict_batch) of 1, 4, 16 and 64 five-second clips:
    clips/s, audio seconds/s, the ratio to batch 1, and the largest score difference
    between a clip's batched result and its result alone;
  - the largest score difference from FunASR's own `Emotion2vec.inference` (no AutoModel) on
    the same model and clips, and for fp32 variants from the same checkpoint on the CPU in fp32;
  - turbo: top-1 agreement with large and the largest score difference, over the batch clips.
It prints a table at the end and writes the same numbers as JSON (--out) after every variant.

    python -m benchmarks.gpu --device cuda --out /tmp/gpu.json
    python -m benchmarks.gpu --device cpu --quick --out /tmp/gpu.json   # dry run, seconds

It needs torch, numpy, pyyaml, pydantic and funasr with what its emotion2vec module imports,
and nothing else: benchmarks/gpu_wheels.sh prepares that set for a machine that has only torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks.batch_parity import mixed_clips
from benchmarks.results import RESULTS, add_results_dir, write_result
from benchmarks.tables import gpu_lines
from serve_app.checkpoints import generate
from serve_app.config import ModelSettings
from serve_app.inference.engine import EmotionEngine

RATE = 16_000
MIB = 2 ** 20
# variant -> (checkpoint, precision); turbo serves large's checkpoint in reduced precision.
VARIANTS = {"base": ("base", "fp32"), "large": ("large", "fp32"), "turbo": ("large", "reduced")}


@dataclasses.dataclass(frozen=True)
class Profile:
    checkpoints: dict[str, tuple[str, int]]  # checkpoint -> (architecture, seed)
    latency_clips_s: tuple[float, ...]       # also the clips compared with FunASR and the CPU
    latency_repeats: int
    batch_clip_s: float
    batch_sizes: tuple[int, ...]
    batch_repeats: int
    warmup: int


PROFILES = {
    "full": Profile({"base": ("base", 0), "large": ("large", 0)}, (1.0, 5.0, 30.0), 30,
                    5.0, (1, 4, 16, 64), 10, 3),
    # The dry run: every path of the full run, on tiny models and short clips.
    "quick": Profile({"base": ("tiny", 0), "large": ("tiny", 1)}, (0.5, 1.0, 2.0), 3,
                     1.0, (1, 2, 4), 2, 1),
}


def import_funasr() -> str:
    """Import FunASR's emotion2vec module and return FunASR's version.

    It imports distutils, which Python 3.12 no longer ships: setuptools provides it, through
    its .pth hook or, where that did not run (a --target install), through its own import."""
    try:
        import distutils.version  # noqa: F401
    except ModuleNotFoundError:
        import setuptools  # noqa: F401  (installs the distutils shim)
    root_level = logging.getLogger().level
    import funasr
    import funasr.models.emotion2vec.model
    logging.getLogger().setLevel(root_level)  # funasr sets the root logger to INFO
    return funasr.__version__


class Timer:
    """Wall time of calls that end on the host, the device drained before and after each."""

    def __init__(self, device: str):
        import torch

        self._sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def __call__(self, fn, repeats: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self._sync()
            started = time.perf_counter()
            fn()
            self._sync()
            times.append(time.perf_counter() - started)
        return times


def gpu_memory(device: str, peak: bool = False) -> dict | None:
    import torch

    if not device.startswith("cuda"):
        return None
    if peak:
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    else:
        allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    return {"allocated_mib": round(allocated / MIB, 1), "reserved_mib": round(reserved / MIB, 1)}


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return float(max(np.max(np.abs(np.subtract(x, y))) for x, y in zip(a, b)))


def top1_agreement(a: list[list[float]], b: list[list[float]]) -> float:
    return sum(int(np.argmax(x) == np.argmax(y)) for x, y in zip(a, b)) / len(a)


def funasr_scores(engine: EmotionEngine, clips: list[np.ndarray]) -> list[list[float]]:
    """FunASR's own inference (what AutoModel.generate calls) on the engine's model: fp32,
    no autocast, whatever the engine's precision."""
    import torch

    tokenizer = SimpleNamespace(token_list=engine.labels)
    with torch.inference_mode():
        results, _ = engine.model.inference(
            list(clips), key=[f"clip{i}" for i in range(len(clips))], tokenizer=tokenizer,
            device=engine.device, granularity="utterance", extract_embedding=False)
    return [r["scores"] for r in results]


def scores_of(engine: EmotionEngine, clips: list[np.ndarray]) -> list[list[float]]:
    return [engine.predict(clip, "utterance", False).scores for clip in clips]


def measure(directory: Path, precision: str, device: str, threads: int, profile: Profile,
            latency_clips: list[np.ndarray], batch_clips: list[np.ndarray]) -> dict:
    """Every measurement of one variant on `device`; the model is released at the end."""
    import torch

    cuda = device.startswith("cuda")
    timer = Timer(device)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    engine = EmotionEngine(ModelSettings(source=str(directory), precision=precision),
                           device, threads)
    info = engine.load()
    row: dict = {"precision": precision, "dtype": info.dtype, "load_s": info.load_s,
                 "params_m": round(sum(p.numel() for p in engine.model.parameters()) / 1e6, 1),
                 "memory_after_load": gpu_memory(device)}
    row["first_predict_s"] = round(timer(lambda: engine.predict(
        batch_clips[0], "utterance", False), 1, 0)[0], 3)

    row["latency"] = []
    for seconds, clip in zip(profile.latency_clips_s, latency_clips):
        times = timer(lambda clip=clip: engine.predict(clip, "utterance", False),
                      profile.latency_repeats, profile.warmup)
        row["latency"].append({"clip_s": seconds, "n": len(times),
                               "p50_ms": round(statistics.median(times) * 1000, 2),
                               "p99_ms": round(float(np.percentile(times, 99)) * 1000, 2)})

    single = scores_of(engine, batch_clips)
    row["batches"] = []
    for size in profile.batch_sizes:
        batch = batch_clips[:size]
        times = timer(lambda batch=batch: engine.predict_batch(batch, "utterance", False),
                      profile.batch_repeats, profile.warmup)
        batched = [p.scores for p in engine.predict_batch(batch, "utterance", False)]
        median = statistics.median(times)
        row["batches"].append({
            "batch": size, "n": len(times), "median_ms": round(median * 1000, 2),
            "clips_per_s": round(size / median, 2),
            "audio_s_per_s": round(sum(len(c) for c in batch) / RATE / median, 1),
            "max_diff_vs_single": max_diff(batched, single[:size])})
    first = row["batches"][0]["clips_per_s"]
    for entry in row["batches"]:
        entry["x_batch1"] = round(entry["clips_per_s"] / first, 2)

    reference = scores_of(engine, latency_clips)
    row["funasr_max_diff"] = max_diff(reference, funasr_scores(engine, latency_clips))
    row["memory_peak"] = gpu_memory(device, peak=True)
    engine.unload()
    engine = None  # free the model before the next variant loads
    return row | {"single_scores": single, "reference_scores": reference}


def cpu_fp32(directory: Path, threads: int, clips: list[np.ndarray],
             scores: list[list[float]]) -> dict:
    """The same checkpoint on the CPU in fp32: largest score difference and top-1 agreement."""
    engine = EmotionEngine(ModelSettings(source=str(directory)), "cpu", threads)
    engine.load()
    cpu = scores_of(engine, clips)
    engine.unload()
    return {"cpu_fp32_max_diff": max_diff(scores, cpu),
            "cpu_fp32_top1_agreement": top1_agreement(scores, cpu)}


def environment(device: str, threads: int, profile_name: str, funasr_version: str) -> dict:
    import torch

    gpu = torch.cuda.get_device_properties(device) if device.startswith("cuda") else None
    return {
        "device": device,
        "device_name": gpu.name if gpu else platform.processor() or platform.machine(),
        "gpu_memory_mib": round(gpu.total_memory / MIB) if gpu else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "funasr": funasr_version,
        "cudnn": torch.backends.cudnn.version() if gpu else None,
        "python": platform.python_version(), "threads": threads, "profile": profile_name,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "weights": "random",
    }


def render(report: dict) -> str:
    """The table, from the JSON report alone (so the JSON holds every number it shows)."""
    env = report["environment"]
    lines = [f"{env['device_name']} ({env['device']}), torch {env['torch']}, "
             f"CUDA {env['cuda'] or '-'}, FunASR {env['funasr']}, Python {env['python']}, "
             f"{env['threads']} CPU threads, profile {env['profile']}"
             f"{', TF32 matmul' if env['tf32_matmul'] else ''}; RANDOM weights; "
             f"{report['total_s']:.0f} s in all"]
    lines.extend(gpu_lines(report))
    lines.extend(goals(report))
    return "\n".join(lines)


def goals(report: dict) -> list[str]:
    """The numbers to hold against the goals: the original demo answered a 5 s clip in 720 ms on
    a T4 (model resident); padded batches of 16 should give at least 4x batch 1's clips/s."""
    clip_s, lines = report["batch_clip_s"], []
    for name, v in report["variants"].items():
        p50 = [e["p50_ms"] for e in v["latency"] if e["clip_s"] == clip_s]
        size = max(e["batch"] for e in v["batches"] if e["batch"] <= 16)
        speedup = next(e["x_batch1"] for e in v["batches"] if e["batch"] == size)
        lines.append(f"goals  {name}: {clip_s:g} s clip p50 "
                     f"{p50[0] if p50 else float('nan'):.1f} ms (demo: 720 ms on a T4); "
                     f"batch {size}: {speedup:.2f}x the clips/s of batch 1 (goal at 16: 4x)")
    return lines


def run(args: argparse.Namespace) -> dict:
    import torch

    started = time.perf_counter()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    profile = PROFILES["quick" if args.quick else "full"]
    if args.batches:  # batch 1 is the baseline of the speed-up
        profile = dataclasses.replace(profile, batch_sizes=tuple(sorted({1, *args.batches})))
    # TF32 tensor cores for fp32 matrix products: what fp32 variants would gain, at ~1e-3
    # relative precision (off by default, as in torch and in the service).
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    funasr_version = import_funasr()
    report = {"environment": environment(args.device, args.threads,
                                         "quick" if args.quick else "full", funasr_version),
              "batch_clip_s": profile.batch_clip_s, "variants": {}, "total_s": 0.0}

    needed = {VARIANTS[name][0] for name in args.variants}
    written: dict[str, tuple[Path, float]] = {}
    for name in sorted(needed):
        arch, seed = profile.checkpoints[name]
        began = time.perf_counter()
        directory = (args.workdir / f"{arch}-seed{seed}").resolve()
        generate.write_checkpoint(directory, arch, seed)
        written[name] = (directory, round(time.perf_counter() - began, 2))

    latency_clips = [clip[:int(s * RATE)] for s, clip in zip(
        profile.latency_clips_s,
        (mixed_clips(1, s, s, seed=i)[0] for i, s in enumerate(profile.latency_clips_s)))]
    batch_clips = mixed_clips(max(profile.batch_sizes), profile.batch_clip_s * 0.96,
                              profile.batch_clip_s, seed=100)

    large_scores = None
    for name in [v for v in VARIANTS if v in args.variants]:  # large before turbo
        checkpoint, precision = VARIANTS[name]
        directory, checkpoint_s = written[checkpoint]
        print(f"[{name}] {directory} ({precision}) on {args.device}", flush=True)
        row = measure(directory, precision, args.device, args.threads, profile,
                      latency_clips, batch_clips)
        single, reference = row.pop("single_scores"), row.pop("reference_scores")
        row |= {"arch": profile.checkpoints[checkpoint][0], "checkpoint_s": checkpoint_s,
                "cpu_fp32_max_diff": None, "cpu_fp32_top1_agreement": None}
        if precision == "fp32":
            row |= cpu_fp32(directory, args.threads, latency_clips, reference)
        if name == "large":
            large_scores = single
        if name == "turbo" and large_scores is not None:
            row["vs_large"] = {"clips": len(single),
                               "top1_agreement": top1_agreement(large_scores, single),
                               "max_diff": max_diff(large_scores, single)}
        report["variants"][name] = row
        report["total_s"] = round(time.perf_counter() - started, 1)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true",
                        help="the dry run: tiny models, short clips, small batches")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes (default 1 4 16 64)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                        help="torch CPU threads (the CPU fp32 reference)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/e2v-gpu"),
                        help="checkpoints are written here (kept for the next run)")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 for fp32 matrix products (the service does not)")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    return add_results_dir(parser, default=None,
                           note="; the --quick dry run writes none unless given")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    report = run(args)
    print(render(report))
    if args.out:
        print(f"JSON: {args.out}")
    if args.quick and args.results_dir is None:
        return
    write_result("gpu", {"benchmark": "gpu", **report}, results_dir=args.results_dir or RESULTS,
                 argv=["benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)],
                 config=f"benchmarks.gpu's own random-weight checkpoints ("
                        f"{report['environment']['profile']} profile) on {args.device}")


if __name__ == "__main__":
    main()
