"""`emotion2vec-serve export --model-version large --format onnx --out DIR`: a variant's model as
one ONNX graph that runs without this project, FunASR or torch.

`--format openvino`: the variant's artefact for `backend: openvino` instead, written into DIR
as a replica writes its `compiled_cache_dir` (the IR, converted once per checkpoint and valid
on any CPU, and the blob compiled for this CPU kind in the variant's precision), after the same
check against eager torch. Replicas whose `compiled_cache_dir` is DIR (a shared volume, or the
folder baked into an image) then only compile, or import the blob, on start: a fleet converts
once.

The checkpoint is loaded as the service loads it (the variant's user_config in the Serve config,
a generated checkpoint written first if the config says so), in fp32, and
serve_app.inference.onnx_graph.ClipClassifier is exported: raw 16 kHz waveforms and their
lengths in; scores, logits and the utterance embedding out. DIR gets model.onnx (the graph),
model.onnx.data (its weights), model.json (labels, input and output contract, checkpoint
sha256, and the parity measured now against FunASR's own AutoModel.generate) and example.py.

Exit status: 0 when the export's scores are within PARITY_TOLERANCE of FunASR's on every check
clip, alone and in one padded batch (openvino: when the artefact passed the check at load); 1
when they are not (the files are written all the same, model.json says by how much; openvino:
what the replica would fall back to, and why); 2 when nothing could be exported (flags, config,
model).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from serve_app.labels import english_name, usable
from serve_app.wire import MIN_SAMPLES, TARGET_SR

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cpu.yaml"
FORMATS = ("onnx", "openvino")
PARITY_TOLERANCE = 1e-5  # largest score difference from FunASR's generate allowed, fp32
EXAMPLE = Path(__file__).with_name("onnx_example.py")


def add_parser(commands) -> None:
    export = commands.add_parser("export", help="write a variant's model as ONNX (runs with "
                                 "onnxruntime alone), or its OpenVINO artefact for a fleet's "
                                 "compiled_cache_dir", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    export.add_argument("--model-version", default=None,
                        help="a variant or an alias; default: the config's default_version")
    export.add_argument("--format", choices=FORMATS, default=FORMATS[0], help="what to write")
    export.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="the Serve config whose model to export "
                             "(default: configs/cpu.yaml)")


def parity_clips() -> list[np.ndarray]:
    """Varied deterministic clips, 0.3 to 4.1 s: harmonic tones with vibrato, a chirp, noise,
    a tone in noise, and a near-silent one (the normalisation's hardest case)."""
    rng = np.random.default_rng(11)

    def tone(seconds: float, pitch: float) -> np.ndarray:
        t = np.arange(int(seconds * TARGET_SR)) / TARGET_SR
        phase = 2 * np.pi * pitch * t + 3 * np.sin(2 * np.pi * 5 * t)
        return 0.1 * sum(np.sin(k * phase) / k for k in range(1, 6))

    t = np.arange(int(2.4 * TARGET_SR)) / TARGET_SR
    clips = [tone(0.3, 210.0), tone(1.7, 140.0),
             0.2 * np.sin(2 * np.pi * (100 + 300 * t) * t),
             rng.standard_normal(int(4.1 * TARGET_SR)) * 0.05,
             tone(3.3, 260.0) + rng.standard_normal(int(3.3 * TARGET_SR)) * 0.02,
             rng.standard_normal(int(0.9 * TARGET_SR)) * 1e-4]
    return [np.asarray(clip, dtype=np.float32) for clip in clips]


def _funasr(directory: str, threads: int):
    from funasr import AutoModel

    root_level = logging.getLogger().level
    logging.disable(logging.INFO)  # its loader logs a line per tensor
    try:  # and prints the pre-training decoder's tensors as missing (they always are)
        with contextlib.redirect_stdout(io.StringIO()):
            return AutoModel(model=directory, device="cpu", ncpu=threads, disable_update=True,
                             disable_pbar=True, disable_log=True)
    finally:
        logging.disable(logging.NOTSET)
        logging.getLogger().setLevel(root_level)  # funasr sets the root logger to INFO


def measure_parity(model_path: Path, directory: str, threads: int) -> dict:
    """The export's scores and embeddings against FunASR's AutoModel.generate on the same
    checkpoint, each clip alone and all of them in one padded batch."""
    from serve_app.inference.backends.onnxruntime import session

    clips = parity_clips()
    auto = _funasr(directory, threads)
    expected = [auto.generate(clip, granularity="utterance", extract_embedding=True)[0]
                for clip in clips]
    del auto
    run = session(model_path, threads)

    def outputs(batch: list[np.ndarray]):
        lengths = np.array([len(c) for c in batch], dtype=np.int64)
        waveform = np.zeros((len(batch), int(lengths.max())), dtype=np.float32)
        for i, clip in enumerate(batch):
            waveform[i, :len(clip)] = clip
        return run.run(["scores", "embedding"], {"waveform": waveform, "lengths": lengths})

    def diffs(scores, embeddings, indices) -> tuple[float, float]:
        score = max(float(np.abs(scores[j] - np.asarray(expected[i]["scores"])).max())
                    for j, i in enumerate(indices))
        embedding = max(float(np.abs(embeddings[j] - expected[i]["feats"]).max())
                        for j, i in enumerate(indices))
        return score, embedding

    alone = [(len(clip) / TARGET_SR, *diffs(*outputs([clip]), [i]))
             for i, clip in enumerate(clips)]
    batch_score, batch_embedding = diffs(*outputs(clips), range(len(clips)))
    worst = max([batch_score, *(row[1] for row in alone)])
    return {"against": "FunASR AutoModel.generate, fp32, the same checkpoint",
            "clips": [{"seconds": round(s, 3), "max_score_diff": d, "max_embedding_diff": e}
                      for s, d, e in alone],
            "batch": {"clips": len(clips), "max_score_diff": batch_score,
                      "max_embedding_diff": batch_embedding},
            "max_score_diff": worst, "tolerance": PARITY_TOLERANCE,
            "within_tolerance": worst <= PARITY_TOLERANCE}


def describe(variant: str, info, labels: list[str], normalize: bool, parity: dict) -> dict:
    """model.json: what a user of the exported files needs to know."""
    import onnx
    import onnxruntime
    import torch

    from serve_app.inference import onnx_graph

    scored = [{"index": j, "name": english_name(labels[i]), "token": labels[i]}
              for j, i in enumerate(usable(labels))]
    normalization = (f"in the graph: each clip is layer-normalised over its own samples "
                     f"(mean 0, variance 1, eps {onnx_graph.NORM_EPS:g}), as FunASR does"
                     if normalize else "none: the graph takes the samples as they are")
    return {
        "format": "onnx", "model_version": variant, "source": info.source,
        "checkpoint_sha256": info.sha256, "weights": info.weights, "precision": "fp32",
        "sample_rate": TARGET_SR, "normalization": normalization,
        "opset": onnx_graph.OPSET, "embedding_dim": info.embedding_dim,
        "files": {"graph": "model.onnx", "weights": "model.onnx" + onnx_graph.EXTERNAL_DATA_SUFFIX,
                  "example": "example.py"},
        "inputs": {
            "waveform": {"dtype": "float32", "shape": ["batch", "samples"],
                         "meaning": f"raw mono audio at {TARGET_SR} Hz (as soundfile reads it: "
                                    "-1..1), one clip per row, zero-padded to the longest"},
            "lengths": {"dtype": "int64", "shape": ["batch"],
                        "meaning": f"each clip's sample count, at least {MIN_SAMPLES}; "
                                   "samples past it are ignored"}},
        "outputs": {
            "scores": {"dtype": "float32", "shape": ["batch", len(scored)],
                       "meaning": "softmax over `labels`, FunASR's scores"},
            "logits": {"dtype": "float32", "shape": ["batch", len(scored)],
                       "meaning": "the head's raw logits of `labels`"},
            "embedding": {"dtype": "float32", "shape": ["batch", info.embedding_dim],
                          "meaning": "the mean of each clip's own frames (FunASR's "
                                     "utterance feats)"}},
        "labels": scored,
        "parity": parity,
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__,
                          "onnxruntime": onnxruntime.__version__, "exporter": "TorchScript "
                          "(torch.onnx.export dynamo=False)"},
    }


def export_onnx(settings, variant: str, out: Path, threads: int) -> dict:
    """Load the variant, write DIR's four files, measure parity; model.json's content."""
    from serve_app.inference import onnx_graph
    from serve_app.inference.engine import EmotionEngine

    engine = EmotionEngine(settings.model_copy(update={"backend": "torch", "precision": "fp32"}),
                           "cpu", threads)
    info = engine.load()
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.onnx"
    classifier = onnx_graph.ClipClassifier(engine.model, engine.labels)
    onnx_graph.write_onnx(classifier, onnx_graph.CLASSIFIER_IO, model_path)
    normalize = classifier.normalize
    del classifier
    engine.unload()
    parity = measure_parity(model_path, info.directory, threads)
    described = describe(variant, info, engine.labels, normalize, parity)
    (out / "model.json").write_text(json.dumps(described, indent=1, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    shutil.copyfile(EXAMPLE, out / "example.py")
    return described


def export_openvino(settings, variant: str, out: Path, threads: int) -> int:
    """The variant's openvino artefact into `out` as a compiled cache; the exit status."""
    from serve_app.inference.engine import EmotionEngine

    engine = EmotionEngine(settings.model_copy(update={"backend": "openvino",
                                                      "compiled_cache_dir": str(out)}),
                           "cpu", threads)
    info = engine.load()
    built = info.backend_info
    if info.backend != "openvino":
        print(f"error: {variant}: {built['note']}", file=sys.stderr)
        return 1
    print(f"wrote {built['cache_dir']} ({variant}, sha256 {info.sha256}, {built['precision']}, "
          f"cache {built['cache']}, {built['build_s']:.1f} s)\nreplicas with "
          f"`compiled_cache_dir: {out}` and `backend: openvino` reuse it", file=sys.stderr)
    return 0


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from serve_app.errors import ModelLoadError
    from serve_app.tools.batch.plan import PlanError, plan_job

    try:
        plan = plan_job(args.config, args.model_version)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    threads = plan.model.threads or min(4, os.cpu_count() or 1)
    if args.format == "openvino":
        try:
            return export_openvino(plan.model, plan.variant, Path(args.out), threads)
        except (ModelLoadError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if plan.model.precision != "fp32":
        print(f"{plan.variant} runs in reduced precision in the service; the export is fp32",
              file=sys.stderr)
    try:
        described = export_onnx(plan.model, plan.variant, Path(args.out), threads)
    except (ModelLoadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parity = described["parity"]
    print(f"wrote {args.out}: model.onnx, model.onnx.data, model.json, example.py "
          f"({plan.variant}, sha256 {described['checkpoint_sha256']})\n"
          f"parity against FunASR's generate: max score difference "
          f"{parity['max_score_diff']:.2e} over {len(parity['clips'])} clips alone and in "
          f"one batch (allowed {PARITY_TOLERANCE:g})", file=sys.stderr)
    return 0 if parity["within_tolerance"] else 1
