"""`emotion2vec-serve batch` beside the two other ways to score a folder, in one run:

  - engine: the engine alone in this process, a hand loop over the files (read, decode as the
    service does, predict), no Ray;
  - batch: the job as a user runs it (the CLI in a subprocess) on this benchmark's own Ray
    cluster, next to the service deployed there with the same variant (idle meanwhile);
  - predict: the predict CLI against that service (HTTP, --concurrency clients).

Same variant, same files (2-10 s, mixed lengths). Prints each path's files/s and its ratio to
the engine's: the engine's clock starts with its model loaded, the job's with the command (its
engine's start included), predict's with the command against the running service. Then the
job's rate after its first rows (its engine started), the peak RSS of its driver and workers,
and its driver's peak RSS for a few hundred and a few thousand tiny files (configs/tiny.yaml),
which should stay flat.

    python -m benchmarks.batch --variant base --files 400
"""

from __future__ import annotations

import argparse
import gc
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import soundfile

from benchmarks.batch_parity import mixed_clips
from benchmarks.results import add_results_dir, relative_config, write_result
from serve_app.audio import sndfile
from serve_app.inference.engine import EmotionEngine
from serve_app.tools.batch.parts import read_rows
from serve_app.tools.batch.plan import plan_job
from serve_app.tools.cluster import load_app, local_serve

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "serve_app.tools.cli"]
MB = 2**20


def write_files(folder: Path, count: int, low_s: float, high_s: float, seed: int) -> float:
    """`count` wav files of mixed lengths; their total duration in seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    total = 0.0
    for index, clip in enumerate(mixed_clips(count, low_s, high_s, seed)):
        soundfile.write(folder / f"{index:05d}.wav", clip, 16_000)
        total += len(clip) / 16_000
    return total


def engine_loop(config: Path, variant: str, files: list[Path]) -> float:
    """Files per second of a plain loop: read, decode, predict (the model loaded first)."""
    plan = plan_job(config, variant)
    engine = EmotionEngine(plan.model, "cpu", plan.model.threads or 2)
    engine.load()
    engine.warmup()
    started = time.perf_counter()
    for path in files:
        decoded = sndfile.decode(path.read_bytes(), **plan.limits.as_dict())
        engine.predict(decoded.waveform, "utterance", False)
    rate = len(files) / (time.perf_counter() - started)
    del engine
    gc.collect()
    return rate


class PeakRss:
    """Samples the RSS of this process's descendants (the job's driver, Ray's workers)."""

    def __init__(self, driver_pid: int, period_s: float = 0.25):
        self.driver_pid, self.period_s = driver_pid, period_s
        self.peaks: dict[str, int] = {"driver": 0, "engine actor": 0, "decode worker": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            for proc in psutil.Process().children(recursive=True):
                try:
                    title = " ".join(proc.cmdline())[:200]
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                if proc.pid == self.driver_pid:
                    kind = "driver"
                elif "EngineStage" in title:
                    kind = "engine actor"
                elif "decode_files" in title:
                    kind = "decode worker"
                else:
                    continue
                self.peaks[kind] = max(self.peaks[kind], rss)


def run_job(args: list[str], timeout_s: float) -> tuple[float, dict[str, int], str]:
    """(wall seconds, peak RSS by kind, stderr) of one `batch` run."""
    started = time.perf_counter()
    job = subprocess.Popen([*CLI, "batch", *args, "--no-progress"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    with PeakRss(job.pid) as rss:
        try:
            _, stderr = job.communicate(timeout=timeout_s)
        finally:
            job.kill()
    wall = time.perf_counter() - started
    if job.returncode != 0:
        raise RuntimeError(f"batch exited {job.returncode}: {stderr[-2000:]}")
    return wall, rss.peaks, stderr


def one_variant_app(config: Path, variant: str) -> dict:
    """The config's app with only `variant` behind the Router (no aliases, no VAD: the job
    beside it gets the CPUs the VAD would hold)."""
    app = load_app(config)
    app["args"]["variants"] = {variant: app["args"]["variants"][variant]}
    app["args"]["vad_num_cpus"] = None
    app["deployments"] = [d for d in app["deployments"] if d["name"] in (variant, "Router")]
    router = next(d for d in app["deployments"] if d["name"] == "Router")
    router["user_config"] = {**router.get("user_config", {}), "default_version": variant,
                             "aliases": {}}
    return app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    parser.add_argument("--variant", default="base")
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--min-s", type=float, default=2.0)
    parser.add_argument("--max-s", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4, help="predict's clients")
    parser.add_argument("--num-cpus", default="1", help="the job's CPUs per engine actor")
    parser.add_argument("--tiny-counts", default="400,4000",
                        help="tiny-file counts for the driver memory check ('' to skip)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    return add_results_dir(parser)


def main() -> None:
    args = _parser().parse_args()
    config = Path(args.config).resolve()
    work = Path(tempfile.mkdtemp(prefix="e2v-batch-bench-"))
    folder = work / "files"
    audio_s = write_files(folder, args.files, args.min_s, args.max_s, seed=3)
    files = sorted(folder.iterdir())
    print(f"{len(files)} files, {args.min_s:g}-{args.max_s:g} s, {audio_s / 3600:.2f} h of "
          f"audio; variant {args.variant} of {config.name}; in {work}", flush=True)

    rates = {"engine": engine_loop(config, args.variant, files)}
    print(f"engine in-process: {rates['engine']:.2f} files/s", flush=True)
    with local_serve(num_cpus=2) as serve:
        import ray

        serve.put(one_variant_app(config, args.variant))
        serve.wait_for("emotion2vec", ("RUNNING",), timeout_s=1200)
        address = ray.get_runtime_context().gcs_address
        wall, peaks, stderr = run_job(
            [str(folder), "--out", str(work / "out"), "--config", str(config), "--address",
             address, "--model-version", args.variant, "--num-cpus", args.num_cpus],
            args.timeout)
        assert read_rows(work / "out").num_rows == len(files)
        # The job's own summary: its wall time, and its first rows (after the engines start).
        job_s = float(re.search(r"files in ([\d.]+) s", stderr).group(1))
        first_rows, first_s = re.search(r"first (\d+) rows after ([\d.]+) s", stderr).groups()
        rates["batch"] = len(files) / wall
        steady = (len(files) - int(first_rows)) / max(1e-9, job_s - float(first_s))
        started = time.perf_counter()
        subprocess.run([*CLI, "predict", str(folder), "--url", serve.url, "--model-version",
                        args.variant, "--concurrency", str(args.concurrency), "--no-progress",
                        "--out", str(work / "predict.jsonl")],
                       check=True, timeout=args.timeout, stderr=subprocess.DEVNULL)
        rates["predict"] = len(files) / (time.perf_counter() - started)
        print(f"\n{'path':<10}{'files/s':>9}{'x engine':>10}")
        for name, rate in rates.items():
            print(f"{name:<10}{rate:>9.2f}{rate / rates['engine']:>10.2f}")
        print(f"batch: first {first_rows} rows after {float(first_s):.1f} s (the engine's "
              f"start), then {steady:.2f} files/s ({steady / rates['engine']:.2f} x engine)")
        print("batch peak RSS: " + ", ".join(f"{kind} {rss / MB:.0f} MB"
                                             for kind, rss in peaks.items()), flush=True)
        result = {
            "benchmark": "batch", "variant": args.variant, "files": len(files),
            "clip_s": f"{args.min_s:g}-{args.max_s:g} s ({audio_s / 3600:.2f} h of audio)",
            "rows": [{"path": name, "files_per_s": round(rate, 2),
                      "x_engine": round(rate / rates["engine"], 2)}
                     for name, rate in rates.items()],
            "first_rows": {"rows": int(first_rows), "s": round(float(first_s), 1),
                           "then_files_per_s": round(steady, 2),
                           "then_x_engine": round(steady / rates["engine"], 2)},
            "peak_rss_mb": {kind: round(rss / MB) for kind, rss in peaks.items()}, "tiny": []}

        tiny_config = REPO / "configs" / "tiny.yaml"
        for count in [int(n) for n in args.tiny_counts.split(",") if n]:
            tiny = work / f"tiny-{count}"
            clip = tiny.parent / "tiny.wav"
            if not clip.exists():
                soundfile.write(clip, mixed_clips(1, 0.3, 0.3, 5)[0], 16_000)
            tiny.mkdir()
            for index in range(count):
                (tiny / f"{index:05d}.wav").hardlink_to(clip)
            wall, peaks, _ = run_job(
                [str(tiny), "--out", str(work / f"out-{count}"), "--config", str(tiny_config),
                 "--address", address, "--model-version", "base", "--files-per-task", "64"],
                args.timeout)
            print(f"{count} tiny files: {count / wall:.1f} files/s, driver peak RSS "
                  f"{peaks['driver'] / MB:.0f} MB", flush=True)
            result["tiny"].append({"files": count, "files_per_s": round(count / wall, 1),
                                   "driver_mb": round(peaks["driver"] / MB)})
    write_result("batch", result, results_dir=args.results_dir,
                 config=f"{relative_config(str(config))} ({args.variant}); the job with "
                        f"--num-cpus {args.num_cpus}")


if __name__ == "__main__":
    main()
