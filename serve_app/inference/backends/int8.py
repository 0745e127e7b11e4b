"""`precision: int8` on `backend: openvino`: the openvino backend's IR, quantised after training
by OpenVINO's NNCF (`nncf.quantize`, model type TRANSFORMER, preset mixed: int8 weights and
activations in the matrix products, fast bias correction, no SmoothQuant) on a small calibration
set, and compiled with the ops left unquantised in bf16 where the CPU has bf16 units (else f32).
Two parts stay unquantised (Recipe): the first conv, whose input is the waveform itself, and the
positional convolutions; on large, quantising them took the embedding cosine from 0.998 to 0.94.

Calibration: generated speech, none of the tests' or benchmarks' clips: espeak-ng saying
CAL_TEXTS in CAL_VOICES at CAL_RATES (a new text and voice pair each clip), white noise added at
CAL_SNR_DB in turn, each clip cut to at most `Recipe.max_s` and layer-normalised over its own
samples as the engine does, fed as the backend feeds the graph (waveform 1 x S float32, padded to
at least 1 s; lengths 1 int64). Deterministic: the same recipe gives the same clips (a fixed
noise seed; espeak-ng's version is in the cache key). Without espeak-ng the set is harmonic
tones with vibrato plus noise, said in the note.

The quantised IR is cached like the f32 one (serve_app/inference/backends/common.py), in its own
folder: its key adds NNCF's version and the calibration recipe to the f32 IR's.

Only where the CPU has int8 dot-product units (VNNI, AMX: INT8_FLAGS). At load the check clip
(common.select) must stay within CHECK_TOLERANCE["int8"] of eager fp32; beyond it, without the
units, or when NNCF is missing or quantisation fails, int8 is refused and the backend runs
`precision: reduced` on openvino (openvino.FALLBACK: bf16, or f32 without bf16 units; checked
against its own bound) with the reason in the note: a replica never fails for it. The quantised
IR is made from the f32 one alone, after the torch encoder was freed.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from serve_app.inference.backends import openvino
from serve_app.inference.backends.common import (
    Artefact,
    BackendInfo,
    BackendUnavailable,
    BuildSpec,
    cache_key,
    cached_artefact,
    compiled_info,
    cpu_identity,
    padded_batch,
)
from serve_app.wire import TARGET_SR

logger = logging.getLogger(__name__)

# The calibration recipe (part of the cache key). Texts and voices are none of the tests' or
# benchmarks' (tests/clips.py, benchmarks/cpu.py).
CAL_TEXTS = ("Honestly, I never thought the garden would look this lovely in the spring.",
             "Stop shouting at me! I have told you three times already.",
             "The train was cancelled again, and nobody bothered to tell us why.",
             "We won the match in the last minute, can you believe it?",
             "I miss the old house; everything there reminds me of my father.",
             "Do not open that door. Something is moving behind it.")
CAL_VOICES = ("en-gb-scotland", "en-029+f2", "en-gb-x-rp+m4", "en-us+f5", "en-gb-x-gbclan",
              "en+m7")
CAL_RATES = (125, 160, 195)
CAL_SNR_DB = (None, 25.0, 12.0)  # None: clean
INT8_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}  # /proc/cpuinfo's names


@dataclass(frozen=True)
class Recipe:
    clips: int = 12          # speech clips (or tones without espeak-ng)
    max_s: float = 4.0       # each clip cut to at most this long
    seed: int = 11           # the added noise
    preset: str = "mixed"    # NNCF's QuantizationPreset: symmetric weights, asymmetric activations
    subset_size: int | None = None  # None: every clip
    fast_bias_correction: bool = True
    # SmoothQuant off: on large (12 clips) it gave embedding cosine 0.9981 and a largest score
    # difference of 9e-3, against 0.9998 and 3e-3 without it, and made quantising 1.5x longer.
    smooth_quant: bool = False
    # Left in bf16/f32 (measured on large: quantising them cost embedding cosine 0.94 on speech,
    # against 0.998 without): the first conv's matrix product, whose input is the waveform
    # itself (10-sample patches: 8 bits of audio), and the positional convolutions.
    keep_waveform_conv: bool = True
    keep_positional_conv: bool = True


RECIPE = Recipe()


def espeak_version() -> str | None:
    """espeak-ng's version line, or None where it is not installed."""
    if not shutil.which("espeak-ng"):
        return None
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or None


def _speak(voice: str, rate: int, text: str) -> np.ndarray:
    import soundfile
    import soxr

    with tempfile.TemporaryDirectory(prefix="e2v-cal-") as folder:
        path = Path(folder) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(path), text],
                       check=True, timeout=60, capture_output=True)
        samples, sr = soundfile.read(path, dtype="float32")
    return soxr.resample(samples, sr, TARGET_SR).astype(np.float32)


def _tone(i: int, seconds: float) -> np.ndarray:
    """A harmonic tone with vibrato and a slow amplitude envelope (no espeak-ng)."""
    t = np.arange(int(seconds * TARGET_SR)) / TARGET_SR
    f0 = 95.0 + 23.0 * i
    phase = 2 * np.pi * f0 * t + (2 + i % 3) * np.sin(2 * np.pi * (4 + i % 5) * t)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (0.7 + 0.3 * (i % 4)) * t) ** 2
    return (0.1 * envelope * sum(np.sin(k * phase) / k for k in range(1, 8))).astype(np.float32)


def calibration_clips(recipe: Recipe, speech: bool = True) -> list[np.ndarray]:
    """The calibration waveforms (raw, 16 kHz), deterministic for a recipe."""
    rng = np.random.default_rng(recipe.seed)
    clips = []
    for i in range(recipe.clips):
        if speech:  # a new (text, voice) pair each clip, rates and noise in turn
            voice = CAL_VOICES[(i + i // len(CAL_TEXTS)) % len(CAL_VOICES)]
            audio = _speak(voice, CAL_RATES[(i // 2) % len(CAL_RATES)],
                           CAL_TEXTS[i % len(CAL_TEXTS)])
        else:
            audio = _tone(i, recipe.max_s * (0.6 + 0.4 * ((i * 7) % 5) / 4))
        audio = audio[: int(recipe.max_s * TARGET_SR)]
        snr = CAL_SNR_DB[i % len(CAL_SNR_DB)]
        noise = rng.standard_normal(len(audio)).astype(np.float32)
        if snr is not None:
            power = float(np.mean(audio ** 2)) or 1e-8
            audio = audio + noise * np.sqrt(power / 10 ** (snr / 10))
        clips.append(audio.astype(np.float32))
    return clips


def graph_inputs(audio: np.ndarray, min_width: int) -> list[np.ndarray]:
    """One clip as the openvino backend feeds the graph: layer-normalised (as the engine does),
    zero-padded to at least `min_width` samples, with its sample count."""
    source = torch.from_numpy(audio)
    return list(padded_batch([F.layer_norm(source, source.shape)], min_width))


def ignored_scope(model, recipe: Recipe):
    """What stays unquantised: the waveform conv (the graph's first MatMul: the conv stack is
    its first computation) and the positional convs (its only GroupConvolutions)."""
    import nncf

    names = []
    if recipe.keep_waveform_conv:
        names = [op.get_friendly_name() for op in model.get_ordered_ops()
                 if op.get_type_name() == "MatMul"][:1]
    types = ["GroupConvolution"] if recipe.keep_positional_conv else []
    return nncf.IgnoredScope(names=names, types=types, validate=False)


def recipe_key(recipe: Recipe, source: str) -> dict:
    """What the calibration depends on, for the cache key."""
    texts = hashlib.sha256("\n".join((*CAL_TEXTS, *CAL_VOICES, str(CAL_RATES),
                                      str(CAL_SNR_DB))).encode()).hexdigest()[:16]
    return {**asdict(recipe), "source": source, "lists": texts}


def _quantize(ir_path: Path, recipe: Recipe, speech: bool, min_width: int,
              folder: Path) -> None:
    """nncf.quantize of the fp32 IR at `ir_path` into `folder`/IR_NAME."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    logging.getLogger("nncf").setLevel(logging.WARNING)  # not a line per op in the replica's log
    started = time.perf_counter()
    model = ov.Core().read_model(str(ir_path))
    samples = [graph_inputs(c, min_width) for c in calibration_clips(recipe, speech)]
    quantized = nncf.quantize(
        model, nncf.Dataset(samples),
        preset=getattr(nncf.QuantizationPreset, recipe.preset.upper()),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=recipe.subset_size or len(samples),
        fast_bias_correction=recipe.fast_bias_correction,
        ignored_scope=ignored_scope(model, recipe),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(
                matmul=-1 if not recipe.smooth_quant else 0.95)))
    ov.save_model(quantized, folder / openvino.IR_NAME, compress_to_fp16=False)
    logger.info("int8: quantised %s on %d clips in %.1f s", ir_path, len(samples),
                time.perf_counter() - started)


def has_int8_units() -> bool:
    """Whether the CPU multiplies int8 in one instruction (AVX-512 VNNI, AVX-VNNI, AMX): where
    int8 pays. Without them OpenVINO emulates it with AVX2, not measured here: reduced instead."""
    return bool(INT8_FLAGS & set(cpu_identity()["flags"].split()))


def load(artefact: Artefact, model: torch.nn.Module, spec: BuildSpec
         ) -> tuple[openvino.OpenVinoBackend, BackendInfo]:
    """The f32 IR of `artefact` quantised (cached in its own folder) and compiled, the ops left
    unquantised in bf16 where the CPU has bf16 units. Needs no torch weights: it runs after the
    encoder was freed. Its check, and the fallback to reduced, are common.select's."""
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailable(f"nncf or openvino is not installed ({exc})") from exc
    if not has_int8_units():
        raise BackendUnavailable("this CPU has no int8 dot-product units (VNNI or AMX)")
    version = espeak_version()
    source = f"espeak-ng {version}" if version else "tones"
    key = cache_key(spec.checkpoint_sha256, "openvino-int8",
                    {"openvino": ov.__version__, "nncf": nncf.__version__,
                     "calibration": recipe_key(RECIPE, source)},
                    [sys.modules[__name__], openvino])
    quantised = cached_artefact(
        spec.cache_root, key, openvino.IR_NAME,
        functools.partial(_quantize, artefact.folder / openvino.IR_NAME, RECIPE,
                          version is not None, openvino.MIN_WIDTH))
    compute = "bf16" if openvino.has_bf16() else "f32"
    compiled = openvino.compile_ir(quantised.folder / openvino.IR_NAME, compute, spec.threads)
    notes = []
    if compute == "f32":
        notes.append("this CPU has no bf16 units: the ops int8 leaves run in f32")
    if version is None:
        notes.append("int8 calibrated on tones and noise: espeak-ng is not installed")
    # build_s from the f32 IR's start: the quantisation is part of this load
    info = compiled_info("openvino", "int8", "; ".join(notes) or None,
                         replace(quantised, started=artefact.started))
    return openvino.OpenVinoBackend(compiled, model), info
