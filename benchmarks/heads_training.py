"""What training a custom head costs, and how far turbo's answers with large's head agree with
large's, in one run:

  - `heads train` on --clips labelled clips (default 1,000) with a fresh embedding cache:
    its wall time, split into the embedding extraction (the batch job's stages, every clip
    decoded and scored) and the fit (cross-validation, the shuffled-label control, the refit
    and its conversion check);
  - the same command again on the same cache: every embedding a cache hit, nothing decoded;
  - `emotion2vec-serve batch` over the same clips with the same variant on the same cluster
    (the job as users run it, no --embeddings): the extraction's clips/s against the job's;
  - with --agreement N: a head trained (`heads train --model-version large`) on N of the
    clips of half the voices; then large's engine and turbo's (large's checkpoint, encoder in
    reduced precision), one after the other in this process, on the other voices' clips, the
    head applied to each pass's embedding as a replica applies it: the fraction of clips where
    turbo's label equals large's, the largest |score difference|, and the same for the
    checkpoint's nine-class head on the same passes.

The clips: three classes that differ in how they are spoken (low and slow, high and fast,
whispered), espeak-ng utterances of 8 voices x 4 texts per class, each file a variant of one
of them (gain, speed, added noise at 15-35 dB SNR, placed in 1-3 s): every file's bytes
differ, so the cache holds each one. `--group-by folder` keeps each voice in one fold.

Starts its own Ray cluster on 127.0.0.1 (--cluster-cpus) and runs both commands as users do,
in subprocesses joined to it (--address), after an untimed `batch` over a few clips (the
cluster's first worker starts); the config's variants load their checkpoints
(configs/cpu.yaml: generated random weights). Prints the CPU flags and how busy the machine
was with other processes meanwhile.

    python -m benchmarks.heads_training --clips 1000 --agreement 240
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import soundfile
from scipy.signal import resample_poly

from benchmarks.results import add_results_dir, cpu_flags, relative_config, write_result
from serve_app.tools.cluster import local_serve

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "serve_app.tools.cli"]
SR = 16_000
VOICES = ["en+m1", "en-us+f2", "en-gb-x-rp+m3", "en-029+f1", "en-gb-scotland+m2",
          "en-us-nyc+f3", "en+m4", "en-us+f4"]
TEXTS = ["good morning, how are you today", "please call me back when you can",
         "I would like to check my order", "that is not what I asked for",
         "thank you for your help", "the line was busy all afternoon",
         "could you say that again please", "I will wait for your answer",
         "we spoke about this last week", "my account number is on the letter",
         "the delivery never arrived", "let me think about it for a moment",
         "is there anything else I should know", "it works fine now, thanks",
         "I have been waiting for an hour", "can you send it by email",
         "nobody told me about the fee", "that sounds good to me",
         "where can I find the form", "the price changed again",
         "I need to speak to someone", "everything is in order",
         "my name is spelled differently", "please hold the line",
         "the meeting moved to tuesday", "we can do it tomorrow",
         "I did not receive the code", "this is the third time I call",
         "all right, that is fine", "send me the details",
         "I am not sure about that", "have a nice evening"]
# label -> (espeak-ng variant or None: the voice's own, pitch, words per minute)
CLASSES = {"low-slow": (None, 15, 120), "high-fast": (None, 85, 230),
           "whisper": ("whisper", 50, 170)}
TEXTS_PER_VOICE = 4
WARMUP = 16  # clips of the untimed job before the timed runs


def _speak(voice: str, text: str, pitch: int, rate: int) -> np.ndarray:
    raw = subprocess.run(["espeak-ng", "--stdout", "-v", voice, "-p", str(pitch), "-s",
                          str(rate), text], check=True, capture_output=True, timeout=60).stdout
    samples, sr = soundfile.read(io.BytesIO(raw), dtype="float32")
    return resample_poly(samples, SR, sr).astype(np.float32)


def make_clips(root: Path, count: int, seed: int) -> list[tuple[Path, str, str]]:
    """`count` wav files under root/label/voice/ (as even as the count allows); returns
    (path, label, voice folder) of each."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = []
    for label, (variant, pitch, rate) in CLASSES.items():
        for v, voice in enumerate(VOICES):
            name = voice if variant is None else f"{voice.split('+')[0]}+{variant}"
            for t in range(TEXTS_PER_VOICE):
                text = TEXTS[(v * TEXTS_PER_VOICE + t) % len(TEXTS)]
                jobs.append((label, f"v{v}", name, text, pitch, rate))
    with ThreadPoolExecutor(2) as pool:
        spoken = list(pool.map(lambda job: _speak(*job[2:]), jobs))
    rng = np.random.default_rng(seed)
    made = []
    for index in range(count):
        label, voice, *_ = jobs[index % len(jobs)]
        source = spoken[index % len(jobs)]
        speed = rng.uniform(0.92, 1.08)  # resampled: tempo and pitch together
        clip = resample_poly(source, 1000, round(1000 * speed)).astype(np.float32)
        length = int(rng.uniform(1.0, 3.0) * SR)
        if len(clip) > length:
            start = rng.integers(0, len(clip) - length + 1)
            clip = clip[start:start + length]
        else:
            lead = rng.integers(0, length - len(clip) + 1)
            clip = np.pad(clip, (lead, length - len(clip) - lead))
        clip *= rng.uniform(0.3, 0.9) / max(1e-6, float(np.abs(clip).max()))
        power = float(np.mean(clip ** 2)) or 1e-8
        snr_db = rng.uniform(15, 35)
        clip += rng.normal(0, np.sqrt(power / 10 ** (snr_db / 10)), len(clip)).astype(np.float32)
        folder = root / label / voice
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:05d}.wav"
        soundfile.write(path, np.clip(clip, -1, 1), SR)
        made.append((path, label, voice))
    return made


class CpuUse:
    """CPU seconds, sampled every second: this process's and its descendants' (the Ray
    cluster, the commands), and the machine's busy time; what other processes used is the
    difference. `mark()` then `since(mark)` gives one step's share."""

    def __init__(self):
        self.ours = self.machine = 0.0
        self._seen: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    def _ours(self) -> float:
        used = 0.0
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                cpu = proc.cpu_times()
            except psutil.Error:
                continue
            total = cpu.user + cpu.system
            used += total - self._seen.get(proc.pid, 0.0)  # a new process: all of it
            self._seen[proc.pid] = total
        return used

    def _run(self) -> None:
        before = self._busy()
        self._ours()
        while not self._stop.wait(1.0):
            now, ours = self._busy(), self._ours()
            with self._lock:
                self.machine += now - before
                self.ours += ours
            before = now

    def __enter__(self) -> CpuUse:
        self.start = self.mark()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def mark(self) -> tuple[float, float, float]:
        with self._lock:
            return time.monotonic(), self.machine, self.ours

    def since(self, mark: tuple[float, float, float]) -> dict:
        """Since `mark`: our CPU seconds, and the cores other processes used on average."""
        now = self.mark()
        ours, machine = now[2] - mark[2], now[1] - mark[1]
        return {"cpu_s": round(ours, 1),
                "other_cores": round(max(0.0, machine - ours) / max(1e-9, now[0] - mark[0]), 2)}


def run_cli(args: list[str], timeout_s: float) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} exited {done.returncode}:\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return wall, done.stderr


def job_summary(stderr: str) -> dict:
    """The batch job's own summary (serve_app/tools/batch/job.py): its seconds, and its first
    rows (after the engine started)."""
    files, job_s = re.search(r"(\d+) files in ([\d.]+) s", stderr).groups()
    first_rows, first_s = re.search(r"first (\d+) rows after ([\d.]+) s", stderr).groups()
    steady = (int(files) - int(first_rows)) / max(1e-9, float(job_s) - float(first_s))
    return {"job_s": float(job_s), "first_rows": int(first_rows),
            "first_rows_s": float(first_s), "then_clips_per_s": round(steady, 2)}


def train(data: Path, out: Path, cache: Path, args, address: str, variant: str,
          extra: list[str] = ()) -> dict:
    wall, stderr = run_cli(["heads", "train", str(data), "--name", out.stem, "--group-by",
                            "folder", "--folds", str(args.folds), "--kind", args.kind,
                            "--config", args.config, "--model-version", variant, "--out",
                            str(out), "--cache-dir", str(cache), "--address", address,
                            "--num-cpus", args.num_cpus, *extra], args.timeout)
    from serve_app.heads.headfile import decode

    meta = decode(out.read_bytes(), 1 << 26).metadata
    training = meta["training"]
    found = {"wall_s": round(wall, 1), "embedding_s": training["embedding_s"],
             "fit_s": training["fit_s"], "cache": training["embedding_cache"],
             "ua": meta["metrics"]["overall"]["ua"],
             "control_ua": meta["metrics"]["control"]["ua"]}
    if training["embedding_cache"]["extracted"]:
        found.update(job_summary(stderr))
    return found


def agreement(config: str, head_file: Path, clips: list[tuple[Path, str, str]]) -> dict:
    """large's and turbo's engines in this process, one after the other: per clip, the
    checkpoint's nine-class scores and the utterance embedding from one pass, and the head
    (trained on large's embeddings) applied to that embedding as a replica applies it (after
    pooling, serve_app/heads/headfile.py)."""
    import gc

    from serve_app.audio import sndfile
    from serve_app.heads.headfile import decode
    from serve_app.inference.engine import EmotionEngine
    from serve_app.tools.batch.plan import plan_job

    head = decode(head_file.read_bytes(), 1 << 26)
    every = range(len(head.labels))
    found, nine, embedded, engines = {}, {}, {}, {}
    for variant in ("large", "turbo"):
        plan = plan_job(config, variant)
        engine = EmotionEngine(plan.model, "cpu", plan.model.threads or 2)
        info = engine.load()
        engine.check_head(head)  # turbo: large's checkpoint, so large's heads
        engine.warmup()
        builtin, embeddings, elapsed = [], [], []
        for path, _, _ in clips:
            decoded = sndfile.decode(path.read_bytes(), **plan.limits.as_dict())
            started = time.perf_counter()
            answer = engine.predict(decoded.waveform, "utterance", True)
            elapsed.append(time.perf_counter() - started)
            builtin.append(answer.scores)
            embeddings.append(answer.embedding)
        embedded[variant] = np.array(embeddings)
        found[variant] = np.array([head.scores(row, every)
                                   for row in head.logits(embedded[variant])])
        nine[variant] = np.array(builtin)
        engines[variant] = {"backend": info.backend, "dtype": info.dtype,
                            "threads": info.threads, "sha256": info.sha256,
                            "ms_per_clip": round(1000 * float(np.median(elapsed)), 1)}
        del engine
        gc.collect()
    assert engines["large"]["sha256"] == engines["turbo"]["sha256"]
    large, turbo = found["large"], found["turbo"]
    truth = np.array([head.labels.index(label) for _, label, _ in clips])

    def ua(predicted):
        return float(np.mean([np.mean(predicted[truth == k] == k) for k in every
                              if np.any(truth == k)]))

    a, b = embedded["large"], embedded["turbo"]
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"clips": len(clips), "labels": head.labels,
            "same_label": round(float(np.mean(large.argmax(1) == turbo.argmax(1))), 4),
            "max_score_diff": float(np.abs(large - turbo).max()),
            "mean_score_diff": float(np.abs(large - turbo).mean()),
            "ua_large": round(ua(large.argmax(1)), 4), "ua_turbo": round(ua(turbo.argmax(1)), 4),
            "nine_class": {
                "same_label": round(float(np.mean(nine["large"].argmax(1)
                                                  == nine["turbo"].argmax(1))), 4),
                "max_score_diff": float(np.abs(nine["large"] - nine["turbo"]).max())},
            "min_embedding_cosine": float(cosine.min()),
            "engines": {name: {k: v for k, v in e.items() if k != "sha256"}
                        for name, e in engines.items()}}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"))
    parser.add_argument("--variant", default="base", help="the backbone of the timed runs")
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--kind", default="linear", choices=("linear", "mlp", "prototype"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--num-cpus", default="1",
                        help="the engine actor's CPUs, for heads train and batch alike")
    parser.add_argument("--cluster-cpus", type=int, default=2)
    parser.add_argument("--agreement", type=int, default=0, metavar="N",
                        help="also train a head on large over N of the clips and compare "
                             "turbo's answers with it to large's (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per command")
    return add_results_dir(parser)


def main() -> None:
    args = _parser().parse_args()
    args.config = str(Path(args.config).resolve())
    work = Path(tempfile.mkdtemp(prefix="e2v-heads-train-"))
    print(f"CPU: {cpu_flags()}", flush=True)
    try:
        started = time.perf_counter()
        clips = make_clips(work / "clips", args.clips, args.seed)
        audio_s = sum(soundfile.info(path).duration for path, _, _ in clips)
        print(f"{len(clips)} clips ({audio_s / 60:.1f} min of audio, {audio_s / len(clips):.2f} "
              f"s each on average) made in {time.perf_counter() - started:.1f} s, in {work}",
              flush=True)
        with CpuUse() as cpu, local_serve(num_cpus=args.cluster_cpus):
            import ray

            address = ray.get_runtime_context().gcs_address
            # Not timed: a job over a few clips, so that neither timed run pays the cluster's
            # first worker starts (Ray Data's, the engine's imports) alone.
            run_cli(["batch", *[str(path) for path, _, _ in clips[:WARMUP]], "--out",
                     str(work / "warm-up"), "--config", args.config, "--model-version",
                     args.variant, "--address", address, "--num-cpus", args.num_cpus,
                     "--no-progress"], args.timeout)
            cache = work / "cache"  # fresh: the first run extracts every clip
            mark = cpu.mark()
            cold = train(work / "clips", work / "cold.safetensors", cache, args, address,
                         args.variant)
            cold.update(cpu.since(mark))
            print(f"heads train, cold cache: {cold}", flush=True)
            mark = cpu.mark()
            wall, stderr = run_cli(["batch", str(work / "clips"), "--out", str(work / "batch"),
                                    "--config", args.config, "--model-version", args.variant,
                                    "--address", address, "--num-cpus", args.num_cpus,
                                    "--no-progress"], args.timeout)
            batch = {"wall_s": round(wall, 1), **job_summary(stderr), **cpu.since(mark)}
            print(f"batch: {batch}", flush=True)
            mark = cpu.mark()
            warm = train(work / "clips", work / "warm.safetensors", cache, args, address,
                         args.variant)
            warm.update(cpu.since(mark))
            print(f"heads train, warm cache: {warm}", flush=True)
            assert warm["cache"] == {"hits": len(clips), "extracted": 0}, warm
            agreed = None
            if args.agreement:
                agreed = _agreement(args, clips, work, address)
            whole = cpu.since(cpu.start)
        runs = _rows(cold, warm, batch, len(clips))
        _print(runs, cold, whole, args, agreed)
        result = {
            "benchmark": "heads_training", "variant": args.variant, "clips": len(clips),
            "clip_s": f"1-3 s, {audio_s / len(clips):.2f} s on average "
                      f"({audio_s / 60:.1f} min of audio)",
            "kind": args.kind, "folds": args.folds, "num_cpus": float(args.num_cpus),
            "rows": runs, "ua": cold["ua"], "control_ua": cold["control_ua"],
            "extraction_over_batch": round(runs[0]["clips_per_s"] / runs[2]["clips_per_s"], 2),
            "other_cores": whole["other_cores"], "agreement": agreed}
        if max(whole["other_cores"], *(row["other_cores"] for row in runs)) >= 0.1:
            result["note"] = (f"other processes used {whole['other_cores']:.2f} of the "
                              f"{psutil.cpu_count()} cores on average during the run; each "
                              "run's share is in its row")
        path = write_result("heads-training", result, results_dir=args.results_dir,
                            config=f"{relative_config(args.config)} ({args.variant}"
                                   + ("; large and turbo" if agreed else "") + ")")
        print(f"written: {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _agreement(args, clips, work: Path, address: str) -> dict:
    """N of the clips at random: train on large over those of half the voices, compare on
    the others' (N=240 of 1,000: about 120 and 120)."""
    picked = np.random.default_rng(args.seed + 1).permutation(len(clips))[:args.agreement]
    chosen = [clips[i] for i in sorted(picked)]
    voices = sorted({voice for _, _, voice in chosen})
    trained_on = set(voices[:len(voices) // 2])
    train_clips = [c for c in chosen if c[2] in trained_on]
    held_out = [c for c in chosen if c[2] not in trained_on]
    manifest = work / "large-train.jsonl"
    manifest.write_text("".join(json.dumps({"path": str(path), "label": label, "group": voice})
                                + "\n" for path, label, voice in train_clips))
    folds = min(args.folds, len(trained_on))
    head_file = work / "large-head.safetensors"
    wall, _ = run_cli(["heads", "train", str(manifest), "--name", "large-head", "--folds",
                       str(folds), "--config", args.config, "--model-version", "large",
                       "--out", str(head_file), "--cache-dir", str(work / "cache"),
                       "--address", address, "--num-cpus", args.num_cpus], args.timeout)
    found = agreement(args.config, head_file, held_out)
    found.update(trained_on=len(train_clips), train_wall_s=round(wall, 1),
                 voices=f"a head trained on large over {len(train_clips)} clips of "
                        f"{len(trained_on)} voices, compared on the other "
                        f"{len(voices) - len(trained_on)} voices")
    return found


def _rows(cold: dict, warm: dict, batch: dict, count: int) -> list[dict]:
    return [
        {"run": "heads train, cold cache", "wall_s": cold["wall_s"],
         "embedding_s": cold["embedding_s"], "job_s": cold["job_s"], "fit_s": cold["fit_s"],
         "clips_per_s": round(count / cold["embedding_s"], 2),
         "then_clips_per_s": cold["then_clips_per_s"],
         "cpu_s": cold["cpu_s"], "other_cores": cold["other_cores"],
         "cache": f"{cold['cache']['hits']} hits, {cold['cache']['extracted']} extracted"},
        {"run": "heads train, warm cache", "wall_s": warm["wall_s"],
         "embedding_s": warm["embedding_s"], "job_s": None, "fit_s": warm["fit_s"],
         "clips_per_s": round(count / warm["embedding_s"], 1), "then_clips_per_s": None,
         "cpu_s": warm["cpu_s"], "other_cores": warm["other_cores"],
         "cache": f"{warm['cache']['hits']} hits, {warm['cache']['extracted']} extracted"},
        {"run": "batch", "wall_s": batch["wall_s"], "embedding_s": None,
         "job_s": batch["job_s"], "fit_s": None,
         "clips_per_s": round(count / batch["job_s"], 2),
         "then_clips_per_s": batch["then_clips_per_s"], "cpu_s": batch["cpu_s"],
         "other_cores": batch["other_cores"], "cache": None}]


def _print(runs, cold, whole, args, agreed) -> None:
    print(f"\n{args.config}: {args.variant}; engine actor --num-cpus {args.num_cpus}; "
          f"{args.kind} head, {args.folds} folds by voice\n")
    columns = (("wall s", "wall_s", 8), ("embed s", "embedding_s", 9), ("job s", "job_s", 8),
               ("fit s", "fit_s", 8), ("clips/s", "clips_per_s", 9),
               ("then", "then_clips_per_s", 7), ("CPU s", "cpu_s", 8),
               ("others", "other_cores", 8))
    print(f"{'run':26}" + "".join(f"{title:>{width}}" for title, _, width in columns)
          + "  cache")
    for row in runs:
        cells = [f"{row[key]:>{width}}" if row[key] is not None else f"{'-':>{width}}"
                 for _, key, width in columns]
        print(f"{row['run']:26}{''.join(cells)}  {row['cache'] or '-'}")
    print("clips/s: over the embedding seconds (heads train) or the job's own (batch); then: "
          "after the first rows; CPU s: this run's processes and the cluster's; others: cores "
          "other processes used meanwhile")
    print(f"extraction / batch: {runs[0]['clips_per_s'] / runs[2]['clips_per_s']:.2f}; head UA "
          f"{cold['ua']:.3f}, shuffled-label control {cold['control_ua']:.3f}")
    print(f"other processes over the whole run: {whole['other_cores']:.2f} cores on average")
    if agreed:
        print(f"\nturbo with large's head ({agreed['voices']}), {agreed['clips']} clips: "
              f"same label {agreed['same_label']:.4f}, max |score diff| "
              f"{agreed['max_score_diff']:.2e} (mean {agreed['mean_score_diff']:.2e}); UA "
              f"large {agreed['ua_large']:.3f}, turbo {agreed['ua_turbo']:.3f}; the nine-class "
              f"head on the same passes: same label {agreed['nine_class']['same_label']:.4f}, "
              f"max |score diff| {agreed['nine_class']['max_score_diff']:.2e}; embeddings' "
              f"least cosine {agreed['min_embedding_cosine']:.6f}; engines {agreed['engines']}")
    print(f"CPU: {cpu_flags()}")


if __name__ == "__main__":
    main()
