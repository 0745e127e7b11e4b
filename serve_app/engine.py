"""The emotion2vec model itself, with no Ray in it: load through FunASR, warm up, predict.

Loading goes through FunASR's `AutoModel`, so a checkpoint is built and filled exactly as
FunASR builds it. Prediction runs the same steps as `Emotion2vec.inference` (layer-norm of
the waveform, `extract_features`, mean over frames, the linear head, softmax) on an array
that the router already decoded, with two differences that keep results honest:
the head and softmax always run in float32 (a bf16 softmax sums to 1 +- 2e-3), and reduced
precision ("turbo") is autocast around the encoder only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve_app import checkpoints
from serve_app.config import ModelSettings
from serve_app.timeline import emotion_timeline

logger = logging.getLogger(__name__)

MIN_SAMPLES = 400  # the conv stem fails below 25 ms at 16 kHz


class ModelLoadError(RuntimeError):
    """The configured model could not be loaded; the message says what to fix."""


def english_name(label: str) -> str:
    """FunASR's '生气/angry' -> 'angry'; '<unk>' -> 'unknown'."""
    if label == "<unk>":
        return "unknown"
    return label.rsplit("/", 1)[-1]


@dataclass
class Prediction:
    labels: list[str]        # FunASR's raw labels, head order
    scores: list[float]      # softmax over the head, float32, same order
    embedding: np.ndarray | None
    inference_ms: float
    timeline: list[dict] | None = None  # granularity=frame: scores per window (timeline.py)


@dataclass
class ModelInfo:
    source: str
    weights: str             # "random" or "pretrained"
    device: str
    dtype: str               # what the encoder computes in
    threads: int
    load_s: float
    sha256: str | None = None  # of model.pt: which weights exactly
    random_weights: dict | None = field(default=None)


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _verify_weights(model, weights_file: Path) -> None:
    """Refuse a checkpoint whose tensors do not match the architecture: FunASR only warns
    about missing keys, and would serve those parameters with random values."""
    import torch

    try:
        state = torch.load(weights_file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {weights_file}: {exc}") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    found = {k.removeprefix("module."): tuple(v.shape) for k, v in state.items()
             if hasattr(v, "shape")}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - found.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if missing or wrong:
        examples = [f"{k} missing" for k in missing[:3]] + [
            f"{k}: {found[k]} in the file, {expected[k]} in the model" for k in wrong[:3]]
        raise ModelLoadError(
            f"{weights_file} does not match the architecture of its config.yaml: "
            f"{len(missing)} missing and {len(wrong)} mis-shaped tensors ({'; '.join(examples)})")


class EmotionEngine:
    """One loaded emotion2vec model. Not thread-safe: one predict at a time."""

    def __init__(self, settings: ModelSettings, device: str, threads: int):
        self.settings = settings
        self.device = device
        self.threads = threads
        self.model = None
        self.labels: list[str] = []
        self.info: ModelInfo | None = None

    # -- loading -------------------------------------------------------------------------
    def _resolve_source(self) -> tuple[str, dict | None]:
        settings = self.settings
        if not settings.is_local:
            return settings.source, None
        path = settings.local_path
        if settings.generate is not None and not checkpoints.is_complete(path):
            logger.warning("no checkpoint at %s: generating a %s checkpoint with RANDOM weights "
                           "(seed %d)", path, settings.generate.arch, settings.generate.seed)
            checkpoints.write_checkpoint(path, settings.generate.arch, settings.generate.seed)
        if not path.is_dir():
            raise ModelLoadError(
                f"model directory {path} does not exist. Point `source` at a directory with "
                "config.yaml, model.pt and tokens.txt, at a hub id (iic/emotion2vec_plus_large), "
                "or add `generate: {arch: base}` to create random weights offline")
        if not checkpoints.is_complete(path):
            missing = [n for n in ("config.yaml", "model.pt", "tokens.txt")
                       if not (path / n).is_file()]
            raise ModelLoadError(f"model directory {path} lacks {', '.join(missing)}")
        return str(path), checkpoints.random_weights_info(path)

    def load(self) -> ModelInfo:
        import torch
        from funasr import AutoModel

        started = time.perf_counter()
        source, random_info = self._resolve_source()
        torch.set_num_threads(self.threads)
        kwargs = dict(model=source, device=self.device, ncpu=self.threads,
                      disable_update=True, disable_pbar=True, disable_log=True,
                      ignore_init_mismatch=False)
        if not self.settings.is_local:
            kwargs["hub"] = self.settings.hub
            if self.settings.revision:
                kwargs["model_revision"] = self.settings.revision
        root_level = logging.getLogger().level
        try:
            auto = AutoModel(**kwargs)
        except Exception as exc:  # FunASR raises many kinds; the message is what matters
            raise ModelLoadError(f"FunASR could not load {source}: {exc}") from exc
        finally:
            logging.getLogger().setLevel(root_level)  # funasr sets the root logger to INFO
        model = auto.model
        if model is None or getattr(model, "proj", None) is None:
            raise ModelLoadError(f"{source} is not an emotion2vec model with a classifier head")
        weights_file = Path(auto.kwargs.get("init_param") or Path(source) / "model.pt")
        _verify_weights(model, weights_file)
        model.eval()
        tokenizer = auto.kwargs.get("tokenizer")
        self.labels = list(tokenizer.token_list) if tokenizer is not None else []
        if len(self.labels) != model.proj.out_features:
            raise ModelLoadError(f"{source}: {len(self.labels)} labels in tokens.txt but the head "
                                 f"has {model.proj.out_features} outputs")
        self.model = model
        self._normalize = bool(model.cfg.get("normalize", False))
        self.info = ModelInfo(
            source=source,
            weights="random" if random_info else "pretrained",
            device=self.device,
            dtype=self._encoder_dtype(),
            threads=self.threads,
            load_s=round(time.perf_counter() - started, 3),
            sha256=_sha256(weights_file),
            random_weights=random_info,
        )
        if random_info:
            logger.warning("loaded %s: RANDOM weights (%s, seed %s); predictions carry no meaning",
                           source, random_info.get("arch"), random_info.get("seed"))
        return self.info

    def identity(self) -> dict:
        """What exactly this engine serves: where from, which weights, in which precision."""
        info = self.info
        return {"source": info.source, "sha256": info.sha256, "weights": info.weights,
                "dtype": info.dtype, "precision": self.settings.precision}

    def _encoder_dtype(self) -> str:
        if self.settings.precision == "fp32":
            return "float32"
        return "float16" if self.device.startswith("cuda") else "bfloat16"

    def _autocast(self):
        import torch

        if self.settings.precision == "fp32":
            return contextlib.nullcontext()
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=device_type, dtype=dtype)

    def warmup(self) -> None:
        """One forward pass so the first request does not pay for lazy initialisation."""
        samples = max(MIN_SAMPLES, int(self.settings.warmup_s * 16_000))
        noise = np.random.default_rng(0).standard_normal(samples).astype(np.float32) * 0.05
        self.predict(noise, granularity="utterance", extract_embedding=False)

    def unload(self) -> None:
        import torch

        self.model = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # -- inference -----------------------------------------------------------------------
    def predict(self, waveform: np.ndarray, granularity: str,
                extract_embedding: bool) -> Prediction:
        import torch
        import torch.nn.functional as F

        if self.model is None:
            raise RuntimeError("no model is loaded")
        started = time.perf_counter()
        # The OpenMP thread count is per calling thread, and Ray sets OMP_NUM_THREADS to the
        # replica's CPU share rounded down: set it in the thread that runs the model.
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            source = torch.from_numpy(waveform).to(self.device)
            if self._normalize:
                source = F.layer_norm(source, source.shape)
            with self._autocast():
                frames = self.model.extract_features(source.view(1, -1), padding_mask=None)["x"]
            frames = frames.float()
            logits = self.model.proj(frames.mean(dim=1))
            for index, label in enumerate(self.labels):
                if label.startswith("unuse"):
                    logits[:, index] = -np.inf
            scores = torch.softmax(logits, dim=-1)[0].tolist()
            embedding = None
            if extract_embedding:
                feats = frames[0].cpu().numpy()
                embedding = feats if granularity == "frame" else np.mean(feats, axis=0)
            timeline = None
            if granularity == "frame":
                masked = [i for i, label in enumerate(self.labels) if label.startswith("unuse")]
                timeline = emotion_timeline(frames[0], self.model.proj, masked,
                                            self.settings.timeline_window_s,
                                            self.settings.timeline_hop_s)
        return Prediction(self.labels, scores, embedding,
                          round((time.perf_counter() - started) * 1000, 3), timeline)
