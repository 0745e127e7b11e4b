"""A job over HTTP (`POST /v1/jobs`) against `emotion2vec-serve batch` on the same folder, in
one run: files per second of each, and how soon a job's first row can be read.

Starts its own Ray cluster on 127.0.0.1 with the dashboard (whose job server runs the jobs),
deploys the `base` variant of a config (default configs/cpu.yaml) alone behind the Router, with
jobs_dir in a temporary folder and jobs.allow_inputs naming the temporary folder of clips
(`--files` clips of 2-4 s cut from espeak-ng speech, else a voiced tone). Both paths get the
same engine and decoding: one engine actor of `--num-cpus` CPUs and decode tasks of
`--decode-cpus` (the Router's jobs.engine_num_cpus and jobs.decode_num_cpus; batch's
`--num-cpus` and `--decode-cpus`), beside the idle service.

- job: its clock runs from the POST to the status saying it ended (polled every 0.2 s); the
  first row is the first time `GET /v1/jobs/{id}/results?limit=1` answers a row, and the first
  count the first status whose `rows` is above 0;
- batch: the CLI in a subprocess with `--address` (this cluster), from its start to its exit.

Both clocks include starting the driver and the engine. Rounds alternate which path goes first.
Other processes' CPU use during the run is measured and recorded (a contended run says so).

    python -m benchmarks.jobs --files 200
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import soundfile

from benchmarks.batch import one_variant_app
from benchmarks.results import add_results_dir, cpu_flags, relative_config, write_result
from benchmarks.serve_latency import speech_clip
from serve_app.tools.batch.parts import read_rows
from serve_app.tools.cluster import local_serve

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "serve_app.tools.cli"]
VARIANT = "base"
RATE = 16_000
POLL_S = 0.2
GOAL = 0.9
CONTENDED_CORES = 0.25  # other processes using more than this (on average) contend the run


def write_clips(folder: Path, count: int, low_s: float, high_s: float, seed: int) -> float:
    """`count` wav files of low_s-high_s seconds cut from one long speech clip at varied
    offsets; their total duration in seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    speech = speech_clip(60.0)
    rng = np.random.default_rng(seed)
    total = 0.0
    for index, seconds in enumerate(rng.uniform(low_s, high_s, count)):
        n = int(seconds * RATE)
        start = int(rng.integers(0, len(speech) - n))
        soundfile.write(folder / f"{index:05d}.wav", speech[start:start + n], RATE)
        total += n / RATE
    return total


class OtherCpu:
    """CPU seconds that processes outside this one's tree (another user's tests, say) spent
    while it ran, sampled every period_s in a thread: the cores they took on average. A
    process once seen in this tree is never counted (Ray's workers outlive their parent)."""

    def __init__(self, period_s: float = 1.0):
        self.me, self.period_s = psutil.Process(), period_s
        self.ours: set[int] = set()
        self.last: dict[int, float] = {}
        self.spent = 0.0
        self.started_wall, self.started = time.time(), time.monotonic()
        self._stop = threading.Event()
        self._sample(first=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self, first: bool = False) -> None:
        self.ours |= {self.me.pid, *(p.pid for p in self.me.children(recursive=True))}
        for proc in psutil.process_iter():
            if proc.pid in self.ours:
                continue
            try:
                times = proc.cpu_times()
                total = times.user + times.system
                if proc.pid in self.last:
                    self.spent += max(0.0, total - self.last[proc.pid])
                elif not first and proc.create_time() >= self.started_wall:
                    self.spent += total  # started meanwhile: all of it was spent meanwhile
                self.last[proc.pid] = total
            except psutil.Error:
                continue

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def cores(self) -> float:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sample()
        return self.spent / max(1e-9, time.monotonic() - self.started)


def run_job(client: httpx.Client, folder: Path) -> dict:
    """Submit a job over the folder and follow it to its end."""
    started = time.perf_counter()
    response = client.post("/v1/jobs", json={"inputs": [str(folder)], "model_version": VARIANT})
    response.raise_for_status()
    job_id = response.json()["job_id"]
    first_row_s = first_count_s = None
    while True:
        job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        now = time.perf_counter() - started
        if first_count_s is None and job["rows"] > 0:
            first_count_s = now
        if first_row_s is None:
            page = client.get(f"/v1/jobs/{job_id}/results", params={"limit": 1})
            if page.raise_for_status().content.strip():
                first_row_s = time.perf_counter() - started
        if job["state"] in ("succeeded", "failed", "cancelled"):
            wall = time.perf_counter() - started
            break
        time.sleep(POLL_S)
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['state']}: {job['error']}")
    return {"wall_s": wall, "first_row_s": first_row_s, "first_count_s": first_count_s,
            "files": job["files"]["done"], "rows": job["rows"], "parts": job["parts"]}


def run_batch(folder: Path, out: Path, config: Path, address: str, args) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [*CLI, "batch", str(folder), "--out", str(out), "--config", str(config), "--address",
         address, "--model-version", VARIANT, "--num-cpus", str(args.num_cpus), "--decode-cpus",
         str(args.decode_cpus), "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"batch exited {done.returncode}: {done.stderr[-2000:]}")
    first = re.search(r"first (\d+) rows after ([\d.]+) s", done.stderr)
    return {"wall_s": wall, "first_row_s": float(first.group(2)) if first else None,
            "files": read_rows(out).num_rows}


def jobs_app(config: Path, jobs_dir: Path, folder: Path, args) -> dict:
    app = one_variant_app(config, VARIANT)
    router = next(d for d in app["deployments"] if d["name"] == "Router")
    router["user_config"].update(jobs_dir=str(jobs_dir), jobs={
        "allow_inputs": [str(folder)], "engine_num_cpus": args.num_cpus,
        "decode_num_cpus": args.decode_cpus})
    return app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--min-s", type=float, default=2.0)
    parser.add_argument("--max-s", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="job and batch runs each (the order alternates)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of the engine actor")
    parser.add_argument("--decode-cpus", type=float, default=0.5, help="CPUs per decode task")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    return add_results_dir(parser)


def _median(values: list[float | None]) -> float | None:
    values = [value for value in values if value is not None]
    return float(np.median(values)) if values else None


def measure(config: Path, work: Path, folder: Path, args) -> dict[str, list[dict]]:
    """Each path's runs, on a cluster of this benchmark's own."""
    runs: dict[str, list[dict]] = {"job": [], "batch": []}
    with local_serve(num_cpus=2, dashboard=True) as serve:
        import ray

        serve.put(jobs_app(config, work / "jobs", folder, args))
        serve.wait_for("emotion2vec", ("RUNNING",), timeout_s=1200)
        address = ray.get_runtime_context().gcs_address
        with httpx.Client(base_url=serve.url, timeout=120) as client:
            for round_ in range(args.rounds):
                order = ("job", "batch") if round_ % 2 == 0 else ("batch", "job")
                for path in order:
                    if path == "job":
                        run = run_job(client, folder)
                    else:
                        run = run_batch(folder, work / f"out-{round_}", config, address, args)
                    if run["files"] != args.files:
                        raise RuntimeError(f"{path} scored {run['files']} of {args.files} files")
                    runs[path].append(run)
                    print(f"round {round_ + 1}, {path}: {args.files / run['wall_s']:.2f} files/s "
                          f"({run['wall_s']:.1f} s); first row after "
                          f"{run['first_row_s'] or float('nan'):.1f} s", flush=True)
    return runs


def main() -> None:
    args = _parser().parse_args()
    config = Path(args.config).resolve()
    work = Path(tempfile.mkdtemp(prefix="e2v-jobs-bench-"))
    try:
        folder = work / "clips"
        audio_s = write_clips(folder, args.files, args.min_s, args.max_s, seed=7)
        print(f"{args.files} clips of {args.min_s:g}-{args.max_s:g} s ({audio_s / 60:.1f} min "
              f"of audio) in {folder}; {VARIANT} of {config.name}; CPU: {cpu_flags()}",
              flush=True)
        load = os.getloadavg()[0]
        others = OtherCpu()
        runs = measure(config, work, folder, args)
        busy = others.cores()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rates = {path: args.files / _median([run["wall_s"] for run in done])
             for path, done in runs.items()}
    ratio = rates["job"] / rates["batch"]
    first = {path: _median([run["first_row_s"] for run in done]) for path, done in runs.items()}
    counted = _median([run["first_count_s"] for run in runs["job"]])
    contended = busy > CONTENDED_CORES
    print(f"\n{'path':<8}{'files/s':>9}{'wall s':>9}{'first row s':>13}")
    for path in runs:
        print(f"{path:<8}{rates[path]:>9.2f}{args.files / rates[path]:>9.1f}"
              f"{first[path] or float('nan'):>13.1f}")
    print(f"job / batch: {ratio:.2f}x files/s (goal {GOAL:g}x or more); the job's first row "
          f"readable after {first['job']:.1f} s, counted in its status after {counted:.1f} s")
    print(f"other processes used {busy:.2f} of {psutil.cpu_count()} cores on average (load "
          f"average {load:.1f} at the start)" + (": a contended run" if contended else ""))
    note = (f"contended: other processes on the machine used {busy:.2f} of "
            f"{psutil.cpu_count()} cores on average during the run" if contended else "")
    write_result("jobs", {
        "benchmark": "jobs", "variant": VARIANT, "files": args.files,
        "clip_s": f"{args.min_s:g}-{args.max_s:g} s ({audio_s / 60:.1f} min of audio)",
        "rounds": args.rounds, "num_cpus": args.num_cpus, "decode_cpus": args.decode_cpus,
        "rows": [{"path": path, "files_per_s": round(rates[path], 2),
                  "wall_s": round(args.files / rates[path], 1),
                  "first_row_s": None if first[path] is None else round(first[path], 1)}
                 for path in runs],
        "job_over_batch": round(ratio, 2), "goal": GOAL,
        "first_count_s": None if counted is None else round(counted, 1),
        "other_cores": round(busy, 2), "load_average_at_start": round(load, 1),
        **({"note": note} if note else {})},
        results_dir=args.results_dir,
        config=f"{relative_config(str(config))} ({VARIANT} alone)")


if __name__ == "__main__":
    main()
