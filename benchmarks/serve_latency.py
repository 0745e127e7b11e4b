"""Time to ready, and per-variant latency over HTTP next to FunASR's in-process generate.

Starts its own Ray cluster on 127.0.0.1, deploys a config (default configs/cpu.yaml) the
way `serve run` does, and measures, side by side in one run:
  - time from deploy to RUNNING (checkpoints generated first if missing: said in the output);
  - p50/p99 of N sequential HTTP requests per variant for one clip;
  - p50 of FunASR's own AutoModel.generate on the same checkpoint and clip, in this process
    (turbo: under the same reduced-precision autocast), with the same thread count: once
    beside the idle cluster (the machine load the replicas see), once with the cluster gone.

    python benchmarks/serve_latency.py --config configs/cpu.yaml --requests 20
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import soundfile

from benchmarks.results import add_results_dir, relative_config, write_result
from serve_app.checkpoints import generate
from serve_app.config import ModelSettings
from serve_app.tools.cluster import load_app, local_serve

REPO = Path(__file__).resolve().parents[1]


def speech_clip(seconds: float) -> np.ndarray:
    """`seconds` of 16 kHz speech from espeak-ng when it is installed, else a voiced tone."""
    import shutil
    import subprocess
    import tempfile

    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "speech.wav"
            text = ("I really did not expect that. Honestly, it is the best news I have had all "
                    "year, and I want to tell everybody about it right now.")
            subprocess.run(["espeak-ng", "-w", str(path), text], check=True, timeout=60)
            samples, rate = soundfile.read(path, dtype="float32")
        import soxr

        samples = soxr.resample(samples, rate, 16_000).astype(np.float32)
        samples = np.tile(samples, int(np.ceil(seconds * 16_000 / len(samples))))
        return samples[: int(seconds * 16_000)]
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.2 * np.sin(2 * np.pi * 180 * t + 3 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def wav_bytes(samples: np.ndarray) -> bytes:
    """16 kHz samples as a WAV file's bytes (what a client uploads)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 16_000, format="WAV")
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def http_latencies(url: str, variant: str, wav: bytes, count: int,
                   fields: Iterator[dict] | None = None) -> list[float]:
    """Seconds per sequential POST /v1/predict (each request with the next of `fields`, if
    given, beside model_version); two warm-up requests not counted."""
    times = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for index in range(count + 2):
            extra = next(fields) if fields is not None else {}
            started = time.perf_counter()
            response = client.post("/v1/predict", files={"file": ("clip.wav", wav)},
                                   data={"model_version": variant, **extra})
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            if index >= 2:  # two warm-up requests
                times.append(elapsed)
    return times


def inprocess_latencies(settings: ModelSettings, clip: np.ndarray, count: int) -> list[float]:
    import torch
    from funasr import AutoModel

    threads = settings.threads or 1
    model = AutoModel(model=str(settings.local_path), device="cpu", ncpu=threads,
                      disable_update=True, disable_pbar=True)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if settings.precision == "reduced"
                else contextlib.nullcontext())
    times = []
    with autocast:
        for index in range(count + 2):
            started = time.perf_counter()
            model.generate(clip, granularity="utterance", extract_embedding=False)
            if index >= 2:
                times.append(time.perf_counter() - started)
    return times


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--clip-seconds", type=float, default=5.0)
    return add_results_dir(parser)


def main() -> None:
    args = _parser().parse_args()

    app = load_app(args.config)
    variants = {d["name"]: ModelSettings.model_validate(d["user_config"])
                for d in app["deployments"] if d["name"] != "Router"}
    missing = [n for n, s in variants.items() if s.is_local and
               not generate.is_complete(s.local_path)]
    clip = speech_clip(args.clip_seconds)
    wav = wav_bytes(clip)

    rows = []
    with local_serve() as serve_handle:
        started = time.perf_counter()
        serve_handle.put(app)
        status = serve_handle.wait_for(app["name"], ("RUNNING", "DEPLOY_FAILED"), timeout_s=900)
        ready_s = time.perf_counter() - started
        if status.status != "RUNNING":
            raise SystemExit(f"deploy failed: {status}")
        print(f"time to ready ({args.config}): {ready_s:.1f} s"
              + (f" (included generating checkpoints for {missing})" if missing else
                 " (checkpoints already on disk)"))
        models = httpx.get(f"{serve_handle.url}/v1/models", timeout=30).json()["variants"]
        for name in variants:
            info = models[name]
            print(f"  {name}: load {info['load_s']} s, {info['dtype']}, {info['threads']} threads,"
                  f" weights {info['weights']}")
        for name in variants:
            rows.append([name, http_latencies(serve_handle.url, name, wav, args.requests)])
        # In-process next to the idle cluster: the same machine load the replicas see.
        for row in rows:
            row.append(inprocess_latencies(variants[row[0]], clip, args.requests))
    for row in rows:  # and on a quiet machine, with the cluster gone
        row.append(inprocess_latencies(variants[row[0]], clip, args.requests))
    print(f"\nclip: {args.clip_seconds:g} s, {args.requests} sequential requests per variant; "
          "in-process = FunASR AutoModel.generate, same checkpoint, clip and threads\n")
    print(f"{'variant':8} {'http p50':>9} {'http p99':>9} {'in-proc p50':>12} {'ratio':>6}"
          f" {'in-proc p50 (quiet)':>20} {'ratio':>6}")
    written = []
    for name, http_times, beside, quiet in rows:
        p50 = statistics.median(http_times)
        beside_p50, quiet_p50 = statistics.median(beside), statistics.median(quiet)
        written.append({"variant": name, "http_p50_ms": round(p50 * 1000),
                        "http_p99_ms": round(percentile(http_times, 99) * 1000),
                        "inproc_p50_ms": round(beside_p50 * 1000),
                        "ratio": round(p50 / beside_p50, 2),
                        "quiet_p50_ms": round(quiet_p50 * 1000),
                        "quiet_ratio": round(p50 / quiet_p50, 2)})
        print(f"{name:8} {p50 * 1000:7.0f}ms {percentile(http_times, 99) * 1000:7.0f}ms "
              f"{beside_p50 * 1000:10.0f}ms {p50 / beside_p50:6.2f} {quiet_p50 * 1000:18.0f}ms "
              f"{p50 / quiet_p50:6.2f}")
    write_result("serve-latency", {
        "benchmark": "serve_latency", "ready_s": round(ready_s, 1),
        "ready_note": (f"included generating checkpoints for {missing}" if missing
                       else "checkpoints already on disk"),
        "clip_s": args.clip_seconds, "requests": args.requests, "rows": written},
        results_dir=args.results_dir, config=relative_config(args.config))


if __name__ == "__main__":
    main()
