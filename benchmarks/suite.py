"""The benchmark suite: one command, one table, every number measured side by side in one run.

On the CPU config (configs/cpu.yaml: base and large architectures, turbo = large in bf16),
with a speech clip (espeak-ng; a voiced tone without it):
  1. naive: load the model for every request, as the original Gradio app did;
  2. in-process singleton: FunASR's AutoModel.generate in a loop, no server (the floor);
  3. this service over HTTP, 1 client: p50/p99 and the ratio to (2);
  4. this service, 8 concurrent clients, batching off vs on, on the configured backend and on
     eager torch (today's path before the compiled backends): throughput and latency;
  5. turbo vs large: latency ratio, and fidelity (top-1 agreement, max score difference,
     embedding cosine) over several speech clips.
Each variant's row names the backend that serves it (configs/cpu.yaml: openvino for all three;
see docs/cpu.md), next to FunASR's eager in-process time on the same checkpoint.
With --device auto and a GPU present, the variants get a GPU each share (same checkpoints).

    python benchmarks/suite.py
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile

from benchmarks.results import add_results_dir, relative_config, write_result
from benchmarks.serve_latency import http_latencies, inprocess_latencies, speech_clip
from serve_app.checkpoints import generate
from serve_app.config import ModelSettings
from serve_app.tools.cluster import load_app, local_serve

REPO = Path(__file__).resolve().parents[1]
FIDELITY_TEXTS = [
    ("en", 140, "I can't believe you did that, this is wonderful news!"),
    ("en-us", 120, "Please leave me alone. I am very tired today."),
    ("en-gb", 175, "Why would anybody do such a thing? It is outrageous."),
    ("en+f3", 160, "Oh no, I think something terrible has happened to the house."),
    ("en+m3", 100, "Well, that is fine. We can meet tomorrow at nine."),
    ("en-us+f2", 200, "Wow, look at that! I did not expect a surprise party at all."),
]


def wav_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 16_000, format="WAV")
    return buffer.getvalue()


def naive_latencies(settings: ModelSettings, clip: np.ndarray, count: int) -> list[float]:
    """Load per request, then answer: what a script without a resident model pays."""
    from funasr import AutoModel

    times = []
    for _ in range(count):
        started = time.perf_counter()
        model = AutoModel(model=str(settings.local_path), device="cpu", ncpu=settings.threads or 1,
                          disable_update=True, disable_pbar=True)
        model.generate(clip)
        times.append(time.perf_counter() - started)
        del model
    return times


def concurrent_run(url: str, variant: str, wav: bytes, clip_s: float, clients: int,
                   seconds: float) -> dict:
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        nonlocal failures
        with httpx.Client(base_url=url, timeout=300) as http:
            while time.monotonic() < deadline and len(latencies) < 10_000:
                started = time.monotonic()
                response = http.post("/v1/predict", files={"file": ("c.wav", wav)},
                                     data={"model_version": variant})
                with lock:
                    if response.status_code == 200:
                        latencies.append(time.monotonic() - started)
                    else:
                        failures += 1

    begin = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 600)
    elapsed = time.monotonic() - begin
    return {"clips_s": len(latencies) / elapsed, "audio_s_s": len(latencies) * clip_s / elapsed,
            "p50": np.percentile(latencies, 50), "p99": np.percentile(latencies, 99),
            "ok": len(latencies), "failed": failures}


def with_settings(app: dict, variant: str, backend: str, max_batch_size: int) -> dict:
    app = copy.deepcopy(app)
    for deployment in app["deployments"]:
        if deployment["name"] == variant:
            deployment["user_config"].update(backend=backend, max_batch_size=max_batch_size,
                                             batch_wait_timeout_s=0.05)
    return app


def eager_bf16_is_emulated() -> bool:
    """Eager bf16 autocast without bf16 units runs ~11x slower than fp32 (docs/cpu.md): timing
    it would take minutes per clip and measure nothing anyone would serve."""
    from serve_app.inference.backends import has_bf16

    try:
        return not has_bf16()
    except ImportError:  # no openvino to ask: assume the units are there
        return False


def models(url: str) -> dict:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["variants"]


def backend_of(info: dict) -> str:
    """The backend a variant's /v1/models entry says runs (a replica that has not said: torch)."""
    return info.get("backend") or "torch"


def wait_applied(url: str, variant: str, backend: str, max_batch_size: int) -> dict:
    """The variant's /v1/models entry once it runs with these settings (a backend that cannot
    run is still the one requested, with torch running)."""
    deadline = time.monotonic() + 600
    while True:
        info = models(url)[variant]
        if (info.get("state") == "ready" and info.get("max_batch_size") == max_batch_size
                and (info.get("backend_info") or {}).get("requested") == backend):
            return info
        assert time.monotonic() < deadline, "settings never applied"
        time.sleep(0.5)


def turbo_fidelity(large: ModelSettings, turbo: ModelSettings) -> dict:
    """Turbo against large fp32, same checkpoint, over espeak-ng voices and rates."""
    import shutil
    import subprocess
    import tempfile

    import soxr

    from serve_app.inference.engine import EmotionEngine

    clips = []
    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as folder:
            for index, (voice, rate, text) in enumerate(FIDELITY_TEXTS):
                path = Path(folder) / f"{index}.wav"
                subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(path), text],
                               check=True, timeout=60, capture_output=True)
                samples, sr = soundfile.read(path, dtype="float32")
                clips.append(soxr.resample(samples, sr, 16_000).astype(np.float32))
    else:
        clips = [speech_clip(3.0 + i) for i in range(4)]
    engines = {}
    for name, settings in (("large", large), ("turbo", turbo)):
        engines[name] = EmotionEngine(settings, "cpu", settings.threads or 2)
        engines[name].load()
    agree, max_diff, cosines = 0, 0.0, []
    for clip in clips:
        a = engines["large"].predict(clip, "utterance", True)
        b = engines["turbo"].predict(clip, "utterance", True)
        agree += int(np.argmax(a.scores) == np.argmax(b.scores))
        max_diff = max(max_diff, float(np.abs(np.subtract(a.scores, b.scores)).max()))
        cosines.append(float(np.dot(a.embedding, b.embedding) /
                             (np.linalg.norm(a.embedding) * np.linalg.norm(b.embedding))))
    return {"clips": len(clips), "top1": agree / len(clips), "max_score_diff": max_diff,
            "min_cosine": min(cosines), "mean_cosine": statistics.mean(cosines)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--naive-requests", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--concurrent-seconds", type=float, default=30.0)
    parser.add_argument("--clip-seconds", type=float, default=5.0)
    return add_results_dir(parser)


def main() -> None:
    args = _parser().parse_args()

    import torch

    gpu = args.device == "auto" and torch.cuda.is_available()
    app = load_app(args.config)
    if gpu:
        for resources in app["args"]["variants"].values():
            resources["num_gpus"] = 0.3
    variants = {d["name"]: ModelSettings.model_validate(d["user_config"])
                for d in app["deployments"] if d["name"] != "Router"}
    for settings in variants.values():
        generate.write_checkpoint(settings.local_path, settings.generate.arch,
                                     settings.generate.seed,
                                     optimizer_state=settings.generate.optimizer_state)
    clip = speech_clip(args.clip_seconds)
    wav = wav_bytes(clip)
    rows: dict[str, dict] = {name: {} for name in variants}

    for name in ("base", "large"):
        rows[name]["naive"] = statistics.median(
            naive_latencies(variants[name], clip, args.naive_requests))
    emulated = eager_bf16_is_emulated()
    for name, settings in variants.items():
        if settings.precision == "reduced" and emulated:
            continue
        rows[name]["inproc"] = statistics.median(
            inprocess_latencies(settings, clip, args.requests))

    with local_serve() as serve_handle:
        serve_handle.put(app)
        serve_handle.wait_for(app["name"], ("RUNNING",), timeout_s=1800)
        served = models(serve_handle.url)
        for name in variants:  # what actually runs (a backend that cannot run falls back)
            rows[name]["backend"] = f"{backend_of(served[name])}/{served[name].get('dtype')}"
        for name in variants:
            times = http_latencies(serve_handle.url, name, wav, args.requests)
            rows[name]["http_p50"], rows[name]["http_p99"] = (np.percentile(times, 50),
                                                              np.percentile(times, 99))
        concurrent = {}
        for name in ("base", "large"):
            configured = variants[name].backend
            for backend in dict.fromkeys(("torch", configured)):
                for size in (1, args.clients):
                    serve_handle.put(with_settings(app, name, backend, size))
                    running = backend_of(wait_applied(serve_handle.url, name, backend, size))
                    concurrent[(name, running, size)] = concurrent_run(
                        serve_handle.url, name, wav, args.clip_seconds, args.clients,
                        args.concurrent_seconds)
            serve_handle.put(app)
    fidelity = turbo_fidelity(variants["large"], variants["turbo"])

    device = "GPU" if gpu else "CPU"
    print(f"\n== emotion2vec-serve benchmark ({device}, {args.config}, "
          f"{args.clip_seconds:g} s speech clip) ==")
    print("(in-proc: FunASR's AutoModel.generate, eager; http: the service on its backend)")
    print(f"{'variant':8} {'backend':17} {'naive p50':>10} {'in-proc p50':>12} {'http p50':>9}"
          f" {'http p99':>9} {'http/in-proc':>13} {'naive/http':>11}")
    for name, row in rows.items():
        naive = f"{row['naive'] * 1000:8.0f}ms" if "naive" in row else f"{'-':>10}"
        ratio = f"{row['naive'] / row['http_p50']:11.1f}" if "naive" in row else f"{'-':>11}"
        inproc = f"{row['inproc'] * 1000:10.0f}ms" if "inproc" in row else f"{'-':>12}"
        served_ratio = (f"{row['http_p50'] / row['inproc']:13.2f}" if "inproc" in row
                        else f"{'-':>13}")
        print(f"{name:8} {row['backend']:17} {naive} {inproc} "
              f"{row['http_p50'] * 1000:7.0f}ms {row['http_p99'] * 1000:7.0f}ms "
              f"{served_ratio} {ratio}")
    if emulated:
        print("(turbo in-proc: not timed, eager bf16 autocast is emulated on this CPU)")
    print(f"\n{args.clients} concurrent clients, {args.concurrent_seconds:g} s each "
          "(x eager: clips/s over eager torch unbatched, the path before compiled backends):")
    print(f"{'variant':8} {'backend':9} {'batch':>5} {'clips/s':>8} {'x eager':>8} "
          f"{'audio s/s':>10} {'p50':>8} {'p99':>8} {'failed':>7}")
    for (name, backend, size), result in concurrent.items():
        eager = concurrent.get((name, "torch", 1))
        gain = f"{result['clips_s'] / eager['clips_s']:8.2f}" if eager else f"{'-':>8}"
        print(f"{name:8} {backend:9} {size:5d} {result['clips_s']:8.2f} {gain} "
              f"{result['audio_s_s']:10.1f} {result['p50'] * 1000:6.0f}ms "
              f"{result['p99'] * 1000:6.0f}ms {result['failed']:7d}")
    print(f"turbo served p50 / large eager in-process p50: "
          f"{rows['turbo']['http_p50'] / rows['large']['inproc']:.2f}")
    inproc_ratio = (f"{rows['turbo']['inproc'] / rows['large']['inproc']:.2f}"
                    if "inproc" in rows["turbo"] else "-")
    print(f"\nturbo/large latency (http p50): "
          f"{rows['turbo']['http_p50'] / rows['large']['http_p50']:.2f}; in-process: "
          f"{inproc_ratio}")
    print(f"turbo fidelity over {fidelity['clips']} speech clips: top-1 agreement "
          f"{fidelity['top1']:.0%}, max score difference {fidelity['max_score_diff']:.4f}, "
          f"embedding cosine min {fidelity['min_cosine']:.4f} / mean {fidelity['mean_cosine']:.4f}")

    def ms(seconds: float | None) -> int | None:
        return None if seconds is None else round(float(seconds) * 1000)

    clients = []
    for (name, backend, size), result in concurrent.items():
        eager = concurrent.get((name, "torch", 1))
        clients.append({"variant": name, "backend": backend, "batch": size,
                        "clips_per_s": round(result["clips_s"], 2),
                        "x_eager": (round(result["clips_s"] / eager["clips_s"], 2) if eager
                                    else None),
                        "audio_s_per_s": round(result["audio_s_s"], 1), "p50_ms": ms(result["p50"]),
                        "p99_ms": ms(result["p99"]), "failed": result["failed"]})
    write_result("cpu-suite" if device == "CPU" else "gpu-suite", {
        "benchmark": "suite", "clip": f"{args.clip_seconds:g} s espeak-ng speech",
        "served": [{"variant": name, "backend": row["backend"],
                    "naive_p50_ms": ms(row.get("naive")),
                    "inproc_p50_ms": ms(row.get("inproc")), "http_p50_ms": ms(row["http_p50"]),
                    "http_p99_ms": ms(row["http_p99"])} for name, row in rows.items()],
        "clients": {"count": args.clients, "seconds": args.concurrent_seconds, "rows": clients},
        "turbo_served_vs_large_eager_inproc": round(
            rows["turbo"]["http_p50"] / rows["large"]["inproc"], 2),
        "turbo_fidelity": {"clips": fidelity["clips"], "top1_agreement": fidelity["top1"],
                           "max_score_diff": round(fidelity["max_score_diff"], 4)}},
        results_dir=args.results_dir, config=relative_config(args.config))


if __name__ == "__main__":
    main()
