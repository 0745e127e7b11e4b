"""The CPU backends side by side, in-process (no Ray): speed, fidelity, cold start, memory.

On generated checkpoints of the published base and large architectures (random weights,
written to ~/.cache/emotion2vec-serve/checkpoints as configs/cpu.yaml does), 2 threads:
  1. speed: a 5 s clip through EmotionEngine.predict on each backend x precision, rounds
     interleaved so that every row sees the same machine load; the ratio to eager fp32 of
     the same architecture; and padded batches of 8 clips against 8 single calls;
  2. fidelity over >= 20 varied clips (espeak-ng speech in several voices and rates, tones,
     noise; 0.5-9 s): fp32 on each backend against FunASR's own AutoModel.generate (scores
     and embeddings), and reduced precision (turbo) and int8 against fp32: max score
     difference, embedding cosine, top-1 agreement (over all clips, and over the speech clips
     alone) and the smallest top-1 margin of the fp32 scores (a random-weight head with flat
     scores would agree by luck; the margin says how much);
  3. cold start: time to a warm engine in a fresh process with an empty artefact cache
     (conversion + compile) and again with the cache filled, and the RSS of each backend's
     process after a 5 s predict (the same process as the warm start).

    python -m benchmarks.cpu                                  # everything (~15-30 min)
    python -m benchmarks.cpu --archs large --stages speed     # one table
    python -m benchmarks.cpu --stages fidelity --clips 24

Absolute times depend on what else the machine runs: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.results import add_results_dir, write_result
from serve_app.checkpoints import generate

CHECKPOINTS = Path("~/.cache/emotion2vec-serve/checkpoints").expanduser()
# onnxruntime runs f32 whatever the precision: its fp32 row only; int8 is openvino's only
COMBOS = [("torch", "fp32"), ("torch", "reduced"), ("openvino", "fp32"),
          ("openvino", "reduced"), ("openvino", "int8"), ("onnxruntime", "fp32")]
VOICES = ["en", "en-us", "en-gb", "en+f3", "en+m3", "en-us+f2", "en+f4", "en-gb+m2"]
TEXTS = ["I can't believe you did that, this is wonderful news!",
         "Please leave me alone. I am very tired today.",
         "Why would anybody do such a thing? It is outrageous.",
         "Oh no, I think something terrible has happened to the house.",
         "Well, that is fine. We can meet tomorrow at nine.",
         "Wow, look at that! I did not expect a surprise party at all."]


def checkpoint(arch: str, optimizer_state: bool = False) -> Path:
    path = CHECKPOINTS / (f"{arch}-seed0" + ("-optimizer" if optimizer_state else ""))
    generate.write_checkpoint(path, arch, 0, optimizer_state=optimizer_state)
    return path


def speech(voice: str, rate: int, text: str) -> np.ndarray | None:
    if not shutil.which("espeak-ng"):
        return None
    import soundfile
    import soxr

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(path), text],
                       check=True, timeout=60, capture_output=True)
        samples, sr = soundfile.read(path, dtype="float32")
    return soxr.resample(samples, sr, 16_000).astype(np.float32)


def varied_clips(count: int) -> list[tuple[str, np.ndarray]]:
    """Speech (when espeak-ng is there), tones and noise, 0.5 to 9 s."""
    rng = np.random.default_rng(0)
    clips = []
    for i in range(count):
        seconds = [0.5, 1.0, 2.0, 3.5, 5.0, 9.0][i % 6]
        kind = ["speech", "speech", "tone", "speech", "noise"][i % 5]
        audio = None
        if kind == "speech":
            audio = speech(VOICES[i % len(VOICES)], 110 + 15 * (i % 7), TEXTS[i % len(TEXTS)])
            if audio is not None:
                audio = audio[: int(seconds * 16_000)] if len(audio) > seconds * 16_000 else audio
        if audio is None and kind != "noise":
            t = np.arange(int(seconds * 16_000)) / 16_000
            phase = 2 * np.pi * (120 + 17 * i) * t + 3 * np.sin(2 * np.pi * (3 + i % 4) * t)
            audio = 0.1 * sum(np.sin(k * phase) / k for k in range(1, 6))
            kind = "tone"
        if audio is None:
            audio = rng.standard_normal(int(seconds * 16_000)) * (0.02 + 0.05 * (i % 3))
        clips.append((f"{kind}{i}-{len(audio) / 16_000:.1f}s", np.asarray(audio, np.float32)))
    return clips


def engine(path: Path, backend: str, precision: str, cache: str, threads: int = 2):
    from serve_app.config import ModelSettings
    from serve_app.inference.engine import EmotionEngine

    settings = ModelSettings(source=str(path), backend=backend, precision=precision,
                             compiled_cache_dir=cache)
    loaded = EmotionEngine(settings, "cpu", threads)
    loaded.load()
    loaded.warmup()
    if loaded.info.backend != backend:
        print(f"  ! {backend}/{precision} fell back: {loaded.info.backend_info['note']}")
    return loaded


def speed(archs: list[str], rounds: int, cache: str, batch: int,
          combos: list[tuple[str, str]]) -> dict:
    clip = varied_clips(5)[4][1]  # 5 s
    clip = np.resize(clip, 80_000).astype(np.float32)
    print(f"\n== speed: 5 s clip, in-process, 2 threads, median of {rounds} interleaved rounds ==")
    print("(cpu ms: the process's CPU time per call, both threads: on a shared machine the wall "
          "time mostly measures waiting; spin-waits count as CPU)")
    print(f"{'arch':6} {'backend':11} {'precision':9} {'ms':>7} {'vs eager fp32':>14} "
          f"{'cpu ms':>7} {'cpu vs eager':>13} "
          f"{f'batch {batch}: ms/clip':>18} {'batched/single':>15}")
    rows = []
    for arch in archs:
        path = checkpoint(arch)
        engines = {combo: engine(path, *combo, cache) for combo in combos}
        times = {combo: [] for combo in combos}
        cpu = {combo: [] for combo in combos}
        batched = {combo: [] for combo in combos}
        clips = [np.roll(clip, 997 * i)[: 80_000 - 1_600 * i] for i in range(batch)]
        for _ in range(rounds):
            for combo, loaded in engines.items():
                started, cpu_started = time.perf_counter(), time.process_time()
                loaded.predict(clip, "utterance", False)
                times[combo].append(time.perf_counter() - started)
                cpu[combo].append(time.process_time() - cpu_started)
        for _ in range(max(2, rounds // 2)):
            for combo, loaded in engines.items():
                started = time.perf_counter()
                loaded.predict_batch(clips, "utterance", False)
                batched[combo].append((time.perf_counter() - started) / batch)
        base = statistics.median(times[("torch", "fp32")])
        cpu_base = statistics.median(cpu[("torch", "fp32")])
        for combo in combos:
            ms, cpu_ms = statistics.median(times[combo]), statistics.median(cpu[combo])
            per_clip = statistics.median(batched[combo])
            print(f"{arch:6} {combo[0]:11} {combo[1]:9} {ms * 1000:7.0f} {ms / base:14.2f} "
                  f"{cpu_ms * 1000:7.0f} {cpu_ms / cpu_base:13.2f} "
                  f"{per_clip * 1000:18.0f} {per_clip / ms:15.2f}", flush=True)
            rows.append({"arch": arch, "backend": combo[0], "precision": combo[1],
                         "ms": round(ms * 1000), "vs_eager": round(ms / base, 2),
                         "cpu_ms": round(cpu_ms * 1000),
                         "cpu_vs_eager": round(cpu_ms / cpu_base, 2),
                         "batch_ms_per_clip": round(per_clip * 1000),
                         "batched_vs_single": round(per_clip / ms, 2)})
        del engines
    return {"clip_s": 5, "threads": 2, "rounds": rounds, "batch": batch, "rows": rows}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def fidelity(archs: list[str], count: int, cache: str, backends: list[str]) -> dict:
    from funasr import AutoModel

    clips = varied_clips(count)
    print(f"\n== fidelity over {len(clips)} clips ({', '.join(n for n, _ in clips[:6])}, ...) ==")
    speech_clips = [i for i, (name, _) in enumerate(clips) if name.startswith("speech")]
    print(f"{'arch':6} {'backend':11} {'precision':9} {'against':8} {'max score diff':>15} "
          f"{'max emb diff':>13} {'min cosine':>11} {'top-1 agree':>12} {'speech top-1':>13} "
          f"{'min margin':>11}")
    rows = []
    for arch in archs:
        path = checkpoint(arch)
        auto = AutoModel(model=str(path), device="cpu", ncpu=2, disable_update=True,
                         disable_pbar=True, disable_log=True)
        reference = [auto.generate(audio, granularity="utterance", extract_embedding=True)[0]
                     for _, audio in clips]
        ref_scores = [np.asarray(r["scores"]) for r in reference]
        margins = [float(np.sort(s)[-1] - np.sort(s)[-2]) for s in ref_scores]
        del auto
        for combo in [c for c in COMBOS if c[0] in backends]:
            loaded = engine(path, *combo, cache)
            got = [loaded.predict(audio, "utterance", True) for _, audio in clips]
            score_diff = max(float(np.abs(np.subtract(g.scores, r)).max())
                             for g, r in zip(got, ref_scores))
            emb_diff = max(float(np.abs(g.embedding - r["feats"]).max())
                           for g, r in zip(got, reference))
            cos = min(cosine(g.embedding, r["feats"]) for g, r in zip(got, reference))
            agrees = [int(np.argmax(g.scores) == np.argmax(r)) for g, r in zip(got, ref_scores)]
            agree, speech_agree = sum(agrees), sum(agrees[i] for i in speech_clips)
            speech_top1 = f"{speech_agree}/{len(speech_clips)}"
            print(f"{arch:6} {combo[0]:11} {combo[1]:9} {'FunASR':8} {score_diff:15.2e} "
                  f"{emb_diff:13.2e} {cos:11.6f} {agree:>6}/{len(clips):<5} {speech_top1:>13} "
                  f"{min(margins):11.2e}", flush=True)
            if loaded.info.backend_info.get("note"):
                print(f"  note: {loaded.info.backend_info['note']}")
            rows.append({"arch": arch, "backend": combo[0], "precision": combo[1],
                         "against": "FunASR", "max_score_diff": score_diff,
                         "max_emb_diff": emb_diff, "min_cosine": cos,
                         "top1": f"{agree}/{len(clips)}", "top1_speech": speech_top1,
                         "min_margin": min(margins), "dtype": loaded.info.dtype})
            del loaded
    return {"clips": len(clips), "rows": rows}


def child(path: str, backend: str, precision: str, cache: str) -> None:
    """In a fresh process: time to a warm engine, RSS after a 5 s predict and its peak while
    loading, then RSS after a hot swap to a second engine of the same settings, as a variant
    does it (the old one dropped, the heap trimmed) (JSON out)."""
    import funasr  # noqa: F401  (imported before the clock starts, as a replica has it)
    import torch  # noqa: F401

    from serve_app.inference import memory

    def status(name: str) -> float:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                      .splitlines() if ":" in line)
        return int(fields[name].split()[0]) / 1024

    clip = np.zeros(80_000, np.float32) + 0.01
    started = time.perf_counter()
    loaded = engine(Path(path), backend, precision, cache)
    ready = time.perf_counter() - started
    peak, cache_use = status("VmHWM"), loaded.info.backend_info.get("cache")
    loaded.predict(clip, "utterance", False)
    rss = status("VmRSS")
    swapped = engine(Path(path), backend, precision, cache)
    loaded.unload()
    loaded = swapped
    memory.release()
    loaded.predict(clip, "utterance", False)
    print(json.dumps({"ready_s": ready, "backend": loaded.info.backend,
                      "cache": cache_use, "rss_mb": rss, "peak_mb": peak,
                      "swap_rss_mb": status("VmRSS")}))


def run_child(path: Path, backend: str, precision: str, cache: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.cpu", "--child", str(path), backend,
                          precision, cache], capture_output=True, text=True, timeout=1800)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"child failed: {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def cold_start(archs: list[str]) -> dict:
    """On the published format (optimizer state beside the weights, as the hub's model.pt)."""
    print("\n== published-format checkpoints: time to a warm engine (fresh process each); RSS "
          "after a 5 s predict, its peak while loading, RSS after a hot swap ==")
    print(f"{'arch':6} {'backend':11} {'precision':9} {'cache':6} {'ready s':>8} {'vs eager':>9} "
          f"{'RSS MB':>7} {'vs eager':>9} {'peak MB':>8} {'vs eager':>9} {'swap MB':>8} "
          f"{'vs eager':>9}")
    rows = []
    for arch in archs:
        path = checkpoint(arch, optimizer_state=True)
        with tempfile.TemporaryDirectory(prefix="e2v-cold-") as cache:
            eager: dict[str, dict] = {}
            # openvino and onnxruntime fp32 twice: cold (empty cache), then warm (artefacts
            # on disk); int8 twice after them: its miss is the quantisation alone (the f32 IR
            # is on disk by then)
            for backend, precision in [("torch", "fp32"), ("torch", "reduced"),
                                       ("openvino", "fp32"), ("openvino", "fp32"),
                                       ("openvino", "reduced"), ("openvino", "int8"),
                                       ("openvino", "int8"), ("onnxruntime", "fp32"),
                                       ("onnxruntime", "fp32")]:
                row = run_child(path, backend, precision, cache)
                if backend == "torch":
                    eager[precision] = row
                base = eager["fp32" if precision == "int8" else precision]
                ratios = {"ready_vs_eager": row["ready_s"] / base["ready_s"],
                          "rss_vs_eager": row["rss_mb"] / base["rss_mb"],
                          "peak_vs_eager": row["peak_mb"] / base["rss_mb"],
                          "swap_vs_eager": row["swap_rss_mb"] / base["swap_rss_mb"]}
                print(f"{arch:6} {backend:11} {precision:9} {row['cache'] or '-':6} "
                      f"{row['ready_s']:8.1f} {ratios['ready_vs_eager']:9.2f} "
                      f"{row['rss_mb']:7.0f} {ratios['rss_vs_eager']:9.2f} "
                      f"{row['peak_mb']:8.0f} {ratios['peak_vs_eager']:9.2f} "
                      f"{row['swap_rss_mb']:8.0f} {ratios['swap_vs_eager']:9.2f}", flush=True)
                rows.append({"arch": arch, "backend": backend, "precision": precision,
                             "cache": row["cache"], "ready_s": round(row["ready_s"], 1),
                             "rss_mb": round(row["rss_mb"]), "peak_mb": round(row["peak_mb"]),
                             "swap_rss_mb": round(row["swap_rss_mb"]),
                             **{name: round(value, 2) for name, value in ratios.items()}})
    return {"checkpoint": "published format (weights under model, optimizer state beside)",
            "rows": rows}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="base,large")
    parser.add_argument("--stages", default="speed,fidelity,cold")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--fidelity-backends", default="torch,openvino,onnxruntime",
                        help="backends checked against FunASR (torch fp32 is FunASR's own path)")
    parser.add_argument("--cache", default="~/.cache/emotion2vec-serve/compiled")
    parser.add_argument("--combos", default=",".join("/".join(c) for c in COMBOS),
                        help="backend/precision pairs of the speed table (torch/fp32 first: "
                             "the ratios' base); torch/reduced is emulated, so slow, without "
                             "bf16 units")
    return add_results_dir(parser)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
        return
    parser = _parser()
    args = parser.parse_args()
    combos = [tuple(pair.split("/")) for pair in args.combos.split(",")]
    if combos[0] != ("torch", "fp32") or not set(combos) <= set(COMBOS):
        parser.error(f"--combos: pairs of {COMBOS}, torch/fp32 first")
    import torch

    torch.set_num_threads(2)
    archs, stages = args.archs.split(","), args.stages.split(",")
    result: dict = {"benchmark": "cpu"}
    if "speed" in stages:
        result["speed"] = speed(archs, args.rounds, args.cache, args.batch, combos)
    if "fidelity" in stages:
        result["fidelity"] = fidelity(archs, args.clips, args.cache,
                                      args.fidelity_backends.split(","))
    if "cold" in stages:
        result["cold"] = cold_start(archs)
    write_result("cpu", result, results_dir=args.results_dir,
                 config=f"generated random-weight checkpoints ({args.archs}), in-process"
                        + (f", combos {args.combos}" if "speed" in stages else "")
                        + (f", fidelity backends {args.fidelity_backends}"
                           if "fidelity" in stages else ""))


if __name__ == "__main__":
    main()
