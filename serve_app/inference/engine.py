"""The emotion2vec model itself, with no Ray in it: load, warm up, predict.

Loading: a local directory, or a hub id resolved to its cached snapshot
(serve_app/checkpoints/hub.py), then one of two loaders, both with the same key mapping and strict
check (serve_app/checkpoints/weights.py):
- `mmap` (default): FunASR's Emotion2vec class built on the meta device (no memory) without
  its pre-training decoder, then given model.pt's tensors memory-mapped (assign=True): about
  1x the weights at peak, whatever else the file holds (optimizer state is never read);
- `funasr`: FunASR's own `AutoModel` (it reads the whole file and copies the weights), then the
  same check of what it loaded, since FunASR only warns about missing tensors.
Prediction runs the same steps as `Emotion2vec.inference` (layer-norm of the waveform,
`extract_features`, mean over frames, the linear head, softmax) on an array that the router
already decoded, with two differences that keep results honest: the head and softmax always run
in float32 (a bf16 softmax sums to 1 +- 2e-3), and reduced precision ("turbo") is autocast
around the encoder only.

`predict_batch` runs several clips of any lengths through one padded forward pass
(serve_app.inference.padded) and gives each clip what `predict` would give it alone, up to float
rounding.

A label set (`labels`: English names, serve_app/labels.py) scores a subset of the head's classes:
the others' logits are masked before the softmax (serve_app/inference/heads.py), per clip, after
the forward pass, so clips batched together may ask for different sets. Predictions carry only
the set's labels, with their softmax scores and raw float32 logits.

The encoder runs on the configured backend (serve_app/inference/backends/): eager PyTorch, or
the same steps compiled by OpenVINO or exported to onnxruntime; the head, softmax, pooling,
windows and timeline are this file's on every backend. A backend that cannot run leaves eager
PyTorch, said in `info`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from serve_app import labels as label_sets
from serve_app.checkpoints import generate, hub, weights
from serve_app.config import ModelSettings
from serve_app.errors import ModelLoadError
from serve_app.heads.headfile import Head, check_backbone
from serve_app.inference import backends, padded
from serve_app.inference.heads import masked_scores
from serve_app.inference.timeline import emotion_timeline
from serve_app.wire import MIN_SAMPLES, TARGET_SR, Granularity

logger = logging.getLogger(__name__)
DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "int8": "int8"}


@dataclass
class Prediction:
    labels: list[str]        # FunASR's raw labels of the label set, head order
    scores: list[float]      # softmax over the label set, float32, same order
    embedding: np.ndarray | None
    inference_ms: float
    timeline: list[dict] | None = None  # granularity=frame: scores per window (timeline.py)
    logits: list[float] | None = None   # the head's raw float32 logits, same order


@dataclass
class ModelInfo:
    source: str              # as configured: a directory, or a hub id
    directory: str           # where the files were read (a hub id's cached snapshot)
    weights: str             # "random" or "pretrained"
    device: str
    dtype: str               # what the encoder computes in
    threads: int
    load_s: float
    sha256: str | None = None  # of model.pt: which weights exactly
    random_weights: dict | None = field(default=None)
    labels: list[str] = field(default_factory=list)  # English names a label set may use
    embedding_dim: int = 0
    parameter_count: int = 0   # of the model as served (the pre-training decoder dropped)
    sample_rate: int = TARGET_SR  # what the model takes; the router resamples to it
    backend: str = "torch"     # what runs the encoder (backends/)
    backend_info: dict | None = None  # requested, precision, note (why not), build_s, cache


def _read_config(path: Path) -> dict:
    """config.yaml as FunASR reads it (OmegaConf)."""
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    model = config.get("model") if isinstance(config, dict) else None
    if model != "Emotion2vec":
        raise ModelLoadError(f"{path} names model {model!r}, not Emotion2vec")
    return config


def _load_mmap(files: weights.ModelFiles):
    """FunASR's Emotion2vec on the meta device, filled with model.pt's tensors, mapped."""
    import torch
    from funasr.models.emotion2vec.model import Emotion2vec

    config = _read_config(files.config)
    labels = weights.read_labels(files.tokens)
    try:
        with torch.device("meta"):
            model = Emotion2vec(**config, vocab_size=len(labels))
    except Exception as exc:
        raise ModelLoadError(f"cannot build the model {files.config} describes: {exc}") from exc
    weights.drop_pretraining_decoder(model)
    tensors = weights.select(model.state_dict(), weights.read_weights(files.weights),
                             weights.scope_pairs(config.get("scope_map"), files.config),
                             files.weights)
    model.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"{files.weights} leaves {left[:3]} unset")
    return model, labels


class EmotionEngine:
    """One loaded emotion2vec model. Not thread-safe: one predict at a time."""

    def __init__(self, settings: ModelSettings, device: str, threads: int):
        self.settings = settings
        self.device = device
        self.threads = threads
        self.model = None
        self.labels: list[str] = []
        self.info: ModelInfo | None = None
        self._batchable = False
        self._backend = None

    # -- loading -------------------------------------------------------------------------
    def _resolve_source(self) -> Path:
        """The local directory to load: a hub id's cached (or downloaded) snapshot, a
        generated checkpoint written if missing or outdated, or the configured directory."""
        settings = self.settings
        if not settings.is_local:
            return hub.resolve(settings.source, settings.hub, settings.revision,
                               settings.download_timeout_s)
        path = settings.local_path
        spec = settings.generate
        if spec is not None:  # written when missing or outdated (it logs what it writes)
            try:
                generate.write_checkpoint(path, spec.arch, spec.seed,
                                             optimizer_state=spec.optimizer_state)
            except ValueError as exc:
                raise ModelLoadError(str(exc)) from exc
        if not path.is_dir():
            raise ModelLoadError(
                f"model directory {path} does not exist. Point `source` at a directory with "
                "config.yaml, model.pt and tokens.txt, at a hub id (iic/emotion2vec_plus_large), "
                "or add `generate: {arch: base}` to create random weights offline")
        missing = weights.model_files(path).missing()
        if missing:
            raise ModelLoadError(f"model directory {path} lacks {', '.join(missing)}")
        return path

    def checkpoint_file(self) -> Path:
        """The weights file `load` reads (a hub id's snapshot fetched, a generated checkpoint
        written if missing), without loading it: its sha256 is what heads are trained on."""
        return weights.model_files(self._resolve_source()).weights

    def load(self) -> ModelInfo:
        import torch

        started = time.perf_counter()
        directory = self._resolve_source()
        files = weights.model_files(directory)
        random_info = generate.random_weights_info(directory)
        torch.set_num_threads(self.threads)
        model, self.labels, weights_file = self._read_model(directory, files)
        if len(self.labels) != model.proj.out_features:
            raise ModelLoadError(f"{directory}: {len(self.labels)} labels in "
                                 f"{files.tokens.name} but the head has "
                                 f"{model.proj.out_features} outputs")
        self._normalize = bool(model.cfg.get("normalize", False))
        try:
            padded.check_supported(model)
            self._batchable = True
        except padded.UnsupportedModel as exc:
            logger.warning("%s: %s; predict_batch runs clip by clip", directory, exc)
            self._batchable = False
        source = str(directory) if self.settings.is_local else self.settings.source
        sha256 = weights.file_sha256(weights_file) if weights_file.is_file() else None
        parameter_count = sum(p.numel() for p in model.parameters())  # before a backend frees any
        self._backend, backend_info, model = backends.select(
            self.settings, model, self.device, self.threads, sha256, self._autocast,
            reload=lambda: self._read_model(directory, files)[0])
        self.model = model
        self.info = ModelInfo(
            source=source,
            directory=str(directory),
            weights="random" if random_info else "pretrained",
            device=self.device,
            dtype=DTYPES[backend_info.precision],
            threads=self.threads,
            load_s=round(time.perf_counter() - started, 3),
            sha256=sha256,
            random_weights=random_info,
            labels=label_sets.valid_names(self.labels),
            embedding_dim=int(model.proj.in_features),
            parameter_count=parameter_count,
            backend=backend_info.backend,
            backend_info=asdict(backend_info),
        )
        if random_info:
            logger.warning("loaded %s: RANDOM weights (%s, seed %s); predictions carry no meaning",
                           source, random_info.get("arch"), random_info.get("seed"))
        return self.info

    def _read_model(self, directory: Path, files: weights.ModelFiles):
        """The model in eval mode on the device, its labels and the weights file read."""
        if self.settings.loader == "mmap":
            model, labels = _load_mmap(files)
            model.to(self.device)
            weights_file = files.weights
        else:
            model, labels, weights_file = self._load_funasr(directory)
        return model.eval(), labels, weights_file

    def _load_funasr(self, directory: Path):
        """FunASR's own path (it reads all of model.pt, optimizer state included, and copies
        the weights), then the check FunASR leaves out: every tensor was in the file."""
        from funasr import AutoModel

        root_level = logging.getLogger().level
        try:
            auto = AutoModel(model=str(directory), device=self.device, ncpu=self.threads,
                             disable_update=True, disable_pbar=True, disable_log=True)
        except Exception as exc:  # FunASR raises many kinds; the message is what matters
            raise ModelLoadError(f"FunASR could not load {directory}: {exc}") from exc
        finally:
            logging.getLogger().setLevel(root_level)  # funasr sets the root logger to INFO
        model = auto.model
        if model is None or getattr(model, "proj", None) is None:
            raise ModelLoadError(f"{directory} is not an emotion2vec model with a classifier head")
        init_param = auto.kwargs.get("init_param")
        if not init_param or not Path(init_param).is_file():
            raise ModelLoadError(f"FunASR found no weights file in {directory}")
        weights_file = Path(init_param)
        weights.drop_pretraining_decoder(model)  # random values FunASR built; frees them
        weights.select(model.state_dict(), weights.read_weights(weights_file),
                       weights.scope_pairs(auto.kwargs.get("scope_map"), directory),
                       weights_file)
        tokenizer = auto.kwargs.get("tokenizer")
        labels = list(tokenizer.token_list) if tokenizer is not None else []
        return model, labels, weights_file

    def identity(self) -> dict:
        """What exactly this engine serves: where from, which weights, in which precision."""
        info = self.info
        return {"source": info.source, "sha256": info.sha256, "weights": info.weights,
                "dtype": info.dtype, "precision": self.settings.precision,
                "backend": info.backend}

    def _autocast(self):
        import torch

        if self.settings.precision == "fp32":
            return contextlib.nullcontext()
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=device_type, dtype=dtype)

    def warmup(self) -> None:
        """One forward pass so the first request does not pay for lazy initialisation."""
        samples = max(MIN_SAMPLES, int(self.settings.warmup_s * TARGET_SR))
        noise = np.random.default_rng(0).standard_normal(samples).astype(np.float32) * 0.05
        self.predict(noise, granularity=Granularity.UTTERANCE, extract_embedding=False)

    def unload(self) -> None:
        import torch

        self.model = self._backend = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # -- inference -----------------------------------------------------------------------
    def _start(self) -> float:
        import torch

        if self.model is None:
            raise RuntimeError("no model is loaded")
        # The OpenMP thread count is per calling thread, and Ray sets OMP_NUM_THREADS to the
        # replica's CPU share rounded down: set it in the thread that runs the model.
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return time.perf_counter()

    def _source(self, waveform: np.ndarray):
        import torch
        import torch.nn.functional as F

        source = torch.from_numpy(waveform).to(self.device)
        if self._normalize:
            source = F.layer_norm(source, source.shape)
        return source

    def label_set(self, names: Sequence[str] | None, head: Head | None = None
                  ) -> tuple[int, ...]:
        """Head indices of a parsed label set (None: every label the head scores) of the
        checkpoint's head or a custom one; UnknownLabel (with the valid names) for a name the
        head does not have."""
        return label_sets.select(names, self.labels if head is None else head.labels)

    def check_head(self, head: Head) -> None:
        """HeadBackboneMismatch unless `head` was trained on this checkpoint."""
        check_backbone(head, self.info.sha256, self.info.embedding_dim)

    def _scores(self, pooled, keeps: Sequence[Sequence[int]],
                heads: Sequence[Head | None]) -> list[tuple[list, list]]:
        """Per row of B x D pooled frames, (scores, logits) over its label set: the
        checkpoint's head in float32 (masked softmax), or the row's custom head
        (serve_app/heads/headfile.py: its own math and temperature)."""
        rows: list = [None] * len(keeps)
        builtin = [i for i, head in enumerate(heads) if head is None]
        if builtin:
            chosen = pooled if len(builtin) == len(heads) else pooled[builtin]
            for i, row in zip(builtin, masked_scores(self.model.proj(chosen),
                                                     [keeps[i] for i in builtin])):
                rows[i] = row
        custom = [i for i, head in enumerate(heads) if head is not None]
        if custom:
            embeddings = pooled[custom].float().cpu().numpy()
            for i, embedding in zip(custom, embeddings):
                logits = heads[i].logits(embedding[None])[0]
                rows[i] = (heads[i].scores(logits, keeps[i]),
                           [float(logits[k]) for k in keeps[i]])
        return rows

    def _timeline(self, frames, granularity: Granularity, keep: Sequence[int],
                  head: Head | None) -> list[dict] | None:
        """granularity=frame: the clip's head on frames pooled over windows (timeline.py)."""
        if granularity != Granularity.FRAME:
            return None
        return emotion_timeline(frames, lambda pooled: self._scores(
            pooled, [keep] * len(pooled), [head] * len(pooled)),
            self.settings.timeline_window_s, self.settings.timeline_hop_s)

    def _labels(self, keep: Sequence[int], head: Head | None) -> list[str]:
        return [(self.labels if head is None else head.labels)[i] for i in keep]

    @staticmethod
    def _embedding(frames, granularity: Granularity) -> np.ndarray:
        feats = frames.cpu().numpy()
        return feats if granularity == Granularity.FRAME else np.mean(feats, axis=0)

    def predict(self, waveform: np.ndarray, granularity: Granularity, extract_embedding: bool,
                labels: Sequence[str] | None = None, head: Head | None = None) -> Prediction:
        import torch

        keep = self.label_set(labels, head)  # before any work: an unknown name costs nothing
        started = self._start()
        with torch.inference_mode():
            frames = torch.cat([self._window_frames(piece) for piece in
                                self._windows(waveform)], dim=1)
            ((scores, logits),) = self._scores(frames.mean(dim=1), [keep], [head])
            embedding = self._embedding(frames[0], granularity) if extract_embedding else None
            timeline = self._timeline(frames[0], granularity, keep, head)
        return Prediction(self._labels(keep, head), scores, embedding,
                          round((time.perf_counter() - started) * 1000, 3), timeline, logits)

    def _windows(self, waveform: np.ndarray) -> list[np.ndarray]:
        """Clips longer than window_s run window by window: attention cost and FunASR's ALiBi
        cache then grow with the window, not the clip. A last piece shorter than a second
        joins the window before it."""
        size = int(self.settings.window_s * TARGET_SR)
        if len(waveform) <= size:
            return [waveform]
        starts = list(range(0, len(waveform), size))
        if len(waveform) - starts[-1] < TARGET_SR:
            starts.pop()
        return [waveform[a:b] for a, b in zip(starts, [*starts[1:], len(waveform)])]

    def _window_frames(self, waveform: np.ndarray):
        """1 x T x D float32 frame features of one clip (or window), FunASR's steps."""
        return self._backend.single(self._source(waveform))

    def predict_batch(self, waveforms: list[np.ndarray], granularity: Granularity,
                      extract_embedding: bool,
                      labels: Sequence[Sequence[str] | None] | None = None,
                      heads: Sequence[Head | None] | None = None) -> list[Prediction]:
        """`predict` for each clip, in input order, from one padded forward pass; `labels`:
        each clip's label set (None: every clip scores every label); `heads`: each clip's
        custom head (None: the checkpoint's), applied after pooling, so one pass serves any.

        Each clip's scores and embedding are those `predict` gives it alone (the frame
        embedding has exactly its own frames). Every Prediction carries the whole batch's
        inference time: that is how long each clip waited for its answer.
        """
        import torch

        if not waveforms:
            return []
        short = [i for i, w in enumerate(waveforms) if len(w) < MIN_SAMPLES]
        if short:
            raise ValueError(f"clips {short} have fewer than {MIN_SAMPLES} samples")
        sets = list(labels) if labels is not None else [None] * len(waveforms)
        custom = list(heads) if heads is not None else [None] * len(waveforms)
        if not len(sets) == len(custom) == len(waveforms):
            raise ValueError(f"{len(sets)} label sets and {len(custom)} heads for "
                             f"{len(waveforms)} clips")
        keeps = [self.label_set(names, head) for names, head in zip(sets, custom)]
        if not self._batchable or any(len(w) > self.settings.window_s * TARGET_SR
                                      for w in waveforms):
            return [self.predict(w, granularity, extract_embedding, names, head)
                    for w, names, head in zip(waveforms, sets, custom)]
        started = self._start()
        with torch.inference_mode():
            frames, lengths = self._backend.batch([self._source(w) for w in waveforms])
            # Each clip's own frames only: padded frames carry no meaning.
            clips = [frames[i, :n] for i, n in enumerate(lengths.tolist())]
            rows = self._scores(torch.stack([clip.mean(dim=0) for clip in clips]), keeps,
                                custom)
            embeddings = [self._embedding(clip, granularity) if extract_embedding else None
                          for clip in clips]
            timelines = [self._timeline(clip, granularity, keep, head)
                         for clip, keep, head in zip(clips, keeps, custom)]
        elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
        return [Prediction(self._labels(keep, head), scores, embedding, elapsed_ms,
                           timeline, logits)
                for keep, head, (scores, logits), embedding, timeline
                in zip(keeps, custom, rows, embeddings, timelines)]
