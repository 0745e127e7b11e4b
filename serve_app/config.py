"""Typed configuration: the application builder's args and each deployment's user_config.

Where each setting lives decides what a redeploy costs:
- builder `args` (AppArgs): which variants exist and their resources. Ray Serve hashes the
  args into the code version, so changing them restarts replicas.
- each variant deployment's `user_config` (ModelSettings): what the variant serves. Changed
  in place through `reconfigure()`, without a restart.
- the Router deployment's `user_config` (RouterSettings): default version, aliases, limits.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from serve_app.audio.waveform import (
    MAX_CHANNELS,
    MAX_DECODE_S,
    MAX_DECODED_BYTES,
    MIN_DURATION_S,
    Limits,
    bytes_per_frame,
)
from serve_app.jobs.settings import JobSettings
from serve_app.wire import MIN_SAMPLES, TARGET_SR

VARIANT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ROUTER_NAME = "Router"
VAD_NAME = "VoiceActivity"  # the VAD's deployment (serve_app/voice_activity.py)
# WS /v1/stream: the range a stream's window_s and hop_s may take (per stream or as defaults).
STREAM_WINDOW_S = (0.5, 30.0)
STREAM_HOP_S = (0.1, 10.0)
# The Serve proxy (uvicorn) refuses WebSocket messages over 16 MiB itself.
PROXY_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# API key ids name keys in logs and metric labels: short, plain, and not the reserved labels.
KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED_KEY_LABELS = ("anonymous", "invalid")
MAX_BATCH_SIZE = 64  # the most clips one padded forward pass may gather


def without_inputs(exc: ValidationError) -> str:
    """A validation error's text without the values given: a key pasted where its sha256
    belongs must not reach a log."""
    return "; ".join(f"{'.'.join(map(str, error['loc'])) or 'value'}: {error['msg']}"
                     for error in exc.errors(include_input=False))


def default_of(model: type[BaseModel], name: str):
    """A settings field's default, for code that needs it before any config arrives."""
    return model.model_fields[name].get_default(call_default_factory=True)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerateSpec(_Strict):
    """Write a random-weight checkpoint at `source` when it is missing (offline configs)."""

    arch: Literal["tiny", "base", "large"]
    seed: int = 0
    # Adam's moments beside the weights, as in the published files (model.pt ~3x the weights)
    optimizer_state: bool = False


# The encoder's backends (serve_app/inference/backends/common.py's REGISTRY has the same names)
BackendName = Literal["torch", "openvino", "onnxruntime"]


class ModelSettings(_Strict):
    """A variant deployment's user_config: which model it serves and how."""

    source: str = Field(description="local model directory, or a hub id such as "
                                    "iic/emotion2vec_plus_large")
    hub: Literal["ms", "hf"] = "ms"
    revision: str | None = None
    generate: GenerateSpec | None = None
    # A hub id is looked up in the hub client's cache first; a download, only when it is not
    # there, is stopped after this long (then the error says how to pre-fill the cache).
    download_timeout_s: float = Field(default=900.0, ge=1.0, le=7200.0)
    # mmap: FunASR's Emotion2vec built on the meta device, model.pt's weights mapped into it
    # (~1x the weights at peak, optimizer state never read); funasr: AutoModel's own path
    # (reads the whole file). Both check every tensor strictly; hub ids load like directories.
    loader: Literal["mmap", "funasr"] = "mmap"
    # reduced: bfloat16 autocast on CPU, float16 autocast on CUDA (what "turbo" means).
    # int8: backend openvino only (a validation error on the others): its IR quantised by NNCF
    # (docs/cpu.md#int8); without VNNI or AMX, or beyond its check at load, openvino reduced.
    precision: Literal["fp32", "reduced", "int8"] = "fp32"
    # What runs the encoder (serve_app/inference/backends/): torch, FunASR's modules in eager
    # PyTorch; openvino, the same steps as one graph compiled for this CPU (any length and
    # batch, fp32 equal to FunASR within float rounding; reduced: bf16); onnxruntime, that
    # graph exported to ONNX and run by onnxruntime on the CPU (f32). Where it cannot run,
    # the variant serves on torch and says why in /v1/models.
    backend: BackendName = "torch"
    # Compiled artefacts, one folder per checkpoint, backend version, CPU and code (reused by
    # restarts and by swaps back to a known checkpoint).
    compiled_cache_dir: str = "~/.cache/emotion2vec-serve/compiled"
    threads: int | None = Field(default=None, ge=1, le=256,
                                description="torch threads; default: the replica's CPUs")
    warmup_s: float = Field(default=1.0, ge=0.05, le=30.0)
    max_audio_s: float = Field(default=600.0, gt=0, description="refuse longer arrays")
    # Longer clips run in windows of this length (their frames are pooled together): bounds
    # memory and cost. Up to it, results equal FunASR's on the whole clip.
    window_s: float = Field(default=30.0, ge=1.0, le=600.0)
    # Dynamic batching (serve.batch): 1 = off. A batch runs as one padded forward pass whose
    # per-clip results equal single-clip inference; it is also capped by padded audio seconds
    # (clips x the longest: serve_app/inference/passes.py), which bounds its memory.
    max_batch_size: int = Field(default=1, ge=1, le=MAX_BATCH_SIZE)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0, le=1.0)
    max_batch_audio_s: float = Field(default=120.0, gt=0)
    idle_unload_s: float = Field(default=0.0, ge=0,
                                 description="release the model after this long unused; 0: never")
    # granularity=frame timeline: scores of frames pooled over windows
    # (serve_app/inference/timeline.py)
    timeline_window_s: float = Field(default=1.0, ge=0.02, le=60.0)
    timeline_hop_s: float = Field(default=0.5, ge=0.02, le=60.0)
    # Custom heads (serve_app/heads) are read on first use and kept, least recently used out.
    max_resident_heads: int = Field(default=256, ge=1, le=100_000,
                                    description="custom heads held per replica")

    @field_validator("source")
    @classmethod
    def _source_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("source must name a model directory or a hub id")
        return value.strip()

    @model_validator(mode="after")
    def _generate_needs_a_path(self) -> ModelSettings:
        # A hub id beside `generate` would get random weights written into a local folder
        # named like the hub id, and serve them as if they were the hub's model.
        if self.generate is not None and not self.source.startswith(("/", "~", ".")) \
                and HUB_ID.match(self.source):
            raise ValueError(
                f"source {self.source!r} looks like a hub id, and `generate` writes random "
                "weights into a local folder of that name: remove `generate` to serve the "
                "hub's published weights, or give a path (/..., ~/..., ./...) for a generated "
                "checkpoint")
        return self

    @model_validator(mode="after")
    def _int8_needs_openvino(self) -> ModelSettings:
        if self.precision == "int8" and self.backend != "openvino":
            raise ValueError(f"precision int8 runs on backend openvino only (its IR quantised "
                             f"by NNCF), not on {self.backend!r}: set backend: openvino, or "
                             f"precision fp32 or reduced")
        return self

    def load_key(self) -> tuple:
        """The settings that need a model load when they change; the others apply live."""
        return (self.source, self.hub, self.revision, self.generate, self.loader,
                self.precision, self.backend, self.compiled_cache_dir, self.threads,
                self.warmup_s)

    @property
    def is_local(self) -> bool:
        """A path (absolute, ~, ./) is local; `owner/name` that is not a path is a hub id."""
        value = self.source
        if value.startswith(("/", "~", ".")) or self.generate is not None:
            return True
        return not HUB_ID.match(value) or Path(value).exists()

    @property
    def local_path(self) -> Path:
        return Path(self.source).expanduser().resolve()


def _key_id(value: str) -> str:
    if not KEY_ID.fullmatch(value) or value in RESERVED_KEY_LABELS:
        raise ValueError(f"API key id {value!r}: use letters, digits, '.', '_' and '-' (at most "
                         f"64), not {' or '.join(RESERVED_KEY_LABELS)}")
    return value


class ApiKeySpec(_Strict):
    """One API key: the sha256 of the key (never the key itself) and its quotas (None: none)."""

    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="hex sha256 of the key")
    requests_per_minute: int | None = Field(default=None, ge=1)
    audio_seconds_per_minute: float | None = Field(default=None, gt=0)
    # Custom heads: every key reads and uses them; `write` also registers and deletes them.
    heads: Literal["read", "write"] = "read"

    @field_validator("sha256")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


# KEY_ID -> its spec: the Router's `api_keys`, and the content of its `api_keys_file`.
ApiKeys = dict[Annotated[str, AfterValidator(_key_id)], ApiKeySpec]


class VadSettings(_Strict):
    """How the speech in a recording is found (silero-vad; serve_app/inference/vad.py) when
    the caller gives no segments, for POST /v1/segments and the stream's utterance events."""

    # Speech probability per 32 ms frame above which a frame is speech (silero's own scale);
    # below threshold - 0.15 it is silence again.
    threshold: float = Field(default=0.5, gt=0, lt=1)
    min_speech_s: float = Field(default=0.25, ge=0.1, le=10.0,
                                description="drop speech shorter than this")
    # Pauses inside a sentence (commas, breaths) are shorter than this: an utterance is what
    # lies between longer silences.
    min_silence_s: float = Field(default=0.5, ge=0.05, le=10.0)
    pad_s: float = Field(default=0.1, ge=0, le=2.0, description="speech padded each side")
    # Longer speech is cut into pieces at its quietest point near this length.
    max_segment_s: float = Field(default=15.0, ge=1.0, le=60.0)

    @model_validator(mode="after")
    def _pieces_fit(self) -> VadSettings:
        if self.min_speech_s > self.max_segment_s:
            raise ValueError(f"min_speech_s ({self.min_speech_s:g}) must not exceed "
                             f"max_segment_s ({self.max_segment_s:g}): no piece could be kept")
        return self


# The decoder's caps for a recording, from its duration cap: a 48 kHz stereo recording of
# the longest duration accepted decodes within max_decoded_bytes, its channels kept apart
# (what the decode allocates: serve_app/audio/waveform.bytes_per_frame); decoding is allowed
# RECORDING_DECODE_S_PER_S wall seconds per second of the longest recording (FFmpeg decodes
# AAC and Opus at several hundred times real time here).
RECORDING_DECODED_BYTES_PER_S = int(48_000 * bytes_per_frame(48_000, 2, keep_channels=True))
RECORDING_DECODE_S_PER_S = 0.05


class SegmentSettings(_Strict):
    """POST /v1/segments: whole recordings, scored utterance by utterance."""

    max_recording_s: float = Field(default=1800.0, gt=0, le=6 * 3600)
    max_recording_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    max_segments: int = Field(default=2000, ge=1, le=100_000,
                              description="given, or found by VAD (beyond: 413)")
    max_concurrent_recordings: int = Field(default=4, ge=1, le=1024,
                                           description="per router replica (beyond: 503)")
    # Segments of one recording at the variant at once: a recording never floods its
    # variant's queue (max_ongoing_requests + max_queued_requests), and a variant that
    # batches gathers them into padded passes.
    segments_in_flight: int = Field(default=4, ge=1, le=64)
    vad: VadSettings = Field(default_factory=VadSettings)
    vad_timeout_s: float = Field(default=120.0, gt=0, description="wait on the VAD")
    # channels=split: each channel is held apart at 16 kHz and scored on its own.
    max_split_channels: int = Field(default=8, ge=2, le=MAX_CHANNELS)

    def decode_limits(self, predict: Limits, split: bool = False) -> Limits:
        """The decoder's limits for a recording, from predict's: they scale with
        max_recording_s, never below predict's; with split, channels kept apart."""
        return Limits(self.max_recording_s, predict.min_duration_s,
                      max(predict.max_decoded_bytes,
                          int(self.max_recording_s * RECORDING_DECODED_BYTES_PER_S)),
                      max(predict.max_decode_s, self.max_recording_s * RECORDING_DECODE_S_PER_S),
                      keep_channels=split,
                      max_channels=self.max_split_channels if split else predict.max_channels)


def _check_weights(where: str, aliases: dict) -> dict:
    """Weighted aliases: finite weights >= 0, one above 0 (variants' and heads' alike)."""
    for alias, target in aliases.items():
        if isinstance(target, str):
            continue
        if not target:
            raise ValueError(f"{where}.{alias}: name at least one target with a weight")
        for name, weight in target.items():
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"{where}.{alias}.{name}: weight {weight} must be a "
                                 "finite number >= 0")
        if not any(weight > 0 for weight in target.values()):
            raise ValueError(f"{where}.{alias}: give at least one target a weight above 0")
    return aliases


class HeadSettings(_Strict):
    """Custom heads at the Router (serve_app/heads): upload bounds, how fresh its view of
    heads_dir is, and rollouts between head revisions."""

    # A registered or deleted head is seen (and a deleted one answers 404) within this long.
    refresh_s: float = Field(default=2.0, ge=0.0, le=300.0)
    max_head_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024,
                                description="a head file's size (beyond: 422 invalid_head)")
    # head alias -> NAME@REV, or a weighted set {NAME@REV: weight} (a canary between head
    # revisions, sticky per X-Session-Key, as variant aliases).
    aliases: dict[str, str | dict[str, float]] = Field(default_factory=dict)
    # NAME@REV -> NAME@REV: requests scored by the first are scored by the second too, in the
    # background, and compared (GET /v1/rollouts).
    shadow: dict[str, str] = Field(default_factory=dict)

    @field_validator("aliases")
    @classmethod
    def _weights(cls, aliases: dict) -> dict:
        return _check_weights("heads.aliases", aliases)


class RouterSettings(_Strict):
    """The Router deployment's user_config."""

    default_version: str = "large"
    # alias -> a variant, or a weighted set {variant: weight} that splits the requests by
    # weight, sticky per X-Session-Key (serve_app/traffic/routing.py). Weights are normalised.
    aliases: dict[str, str | dict[str, float]] = Field(default_factory=dict)
    # primary variant -> shadow variant: every request the primary answered is also sent to
    # the shadow in the background and the answers compared (serve_app/traffic/shadow.py).
    shadow: dict[str, str] = Field(default_factory=dict)
    shadow_timeout_s: float = Field(default=30.0, gt=0, description="wait on a shadow variant")
    shadow_max_pending: int = Field(default=8, ge=1, le=1024,
                                    description="shadow calls in flight; beyond: dropped")
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    # KServe v2 JSON bodies (serve_app/api/kserve_codec.py): a waveform as JSON text takes
    # ~17 bytes a sample as clients write float32 (120 s: ~32 MB), so it has its own cap;
    # binary tensors use the upload cap.
    max_json_waveform_bytes: int = Field(default=40 * 1024 * 1024, ge=1024)
    max_duration_s: float = Field(default=120.0, gt=0)
    # The conv stem needs MIN_SAMPLES (25 ms); below 0.1 s there is no emotion.
    min_duration_s: float = Field(default=MIN_DURATION_S, ge=MIN_SAMPLES / TARGET_SR)
    model_timeout_s: float = Field(default=60.0, gt=0, description="wait on a variant")
    # Decoding limits, checked per decoded block whatever the header says.
    max_decoded_bytes: int = Field(default=MAX_DECODED_BYTES, ge=2**20,
                                   description="decoded float32 samples, all channels")
    max_decode_s: float = Field(default=MAX_DECODE_S, gt=0, le=300,
                                description="wall time per decode")
    # FFmpeg decodes run in this many worker processes (a hang or crash is contained there);
    # 0 runs them in the router's threads.
    decode_workers: int = Field(default=2, ge=0, le=64)
    output_dir: str | None = Field(default=None, description="save each result here")
    # WS /v1/stream (serve_app/api/stream.py). A session is also bounded by the proxy's
    # http_options.request_timeout_s, counted from the handshake: keep stream_max_session_s
    # under it, so that a stream ends with an error event rather than a dropped connection.
    stream_window_s: float = Field(default=2.0, ge=STREAM_WINDOW_S[0], le=STREAM_WINDOW_S[1])
    stream_hop_s: float = Field(default=0.5, ge=STREAM_HOP_S[0], le=STREAM_HOP_S[1])
    stream_max_s: float = Field(default=45.0, gt=0, description="longest stream in seconds "
                                "of audio (at most max_duration_s: the result is a predict)")
    stream_max_session_s: float = Field(default=55.0, gt=0,
                                        description="longest stream, wall clock")
    stream_idle_timeout_s: float = Field(default=10.0, gt=0,
                                         description="close a stream silent this long")
    stream_max_message_bytes: int = Field(default=1024 * 1024, ge=1024,
                                          le=PROXY_MAX_MESSAGE_BYTES)
    max_streams: int = Field(default=16, ge=1, description="open streams per router replica")
    # POST /v1/segments (serve_app/segments): its own limits, VAD and concurrency.
    segments: SegmentSettings = Field(default_factory=SegmentSettings)
    # Custom heads (docs/heads.md): a directory or a filesystem URI (s3://, gs://, file://)
    # that every node sees; `heads train` writes there, `head=NAME[@REV]` reads there.
    heads_dir: str = "~/.cache/emotion2vec-serve/heads"
    heads: HeadSettings = Field(default_factory=HeadSettings)
    # Jobs over HTTP (docs/jobs.md): each job's folder (record, status, Parquet parts) under
    # jobs_dir, a directory or a filesystem URI that every node sees.
    jobs_dir: str = "~/.cache/emotion2vec-serve/jobs"
    jobs: JobSettings = Field(default_factory=JobSettings)

    @model_validator(mode="after")
    def _stream_hop(self) -> RouterSettings:
        if self.stream_hop_s > self.stream_window_s:
            raise ValueError("stream_hop_s must not exceed stream_window_s")
        return self
    # API keys (serve_app/traffic/access.py). None configured (and no file): the API is open.
    api_keys: ApiKeys = Field(default_factory=dict)
    api_keys_file: str | None = Field(default=None, description="a YAML or JSON file of more "
                                      "keys, shaped as api_keys; re-read when it changes")
    # The quotas are per minute; a key may spend this many seconds' worth of them at once
    # (60: a whole minute's). Shorter windows smooth bursts (and make tests quick).
    quota_window_s: float = Field(default=60.0, ge=1.0, le=3600.0)
    # Router replicas exchange what each key spent this often (serve_app/traffic/quota_share.py):
    # a key may overshoot by what the other replicas admit in one interval, then waits it out.
    quota_sync_s: float = Field(default=0.5, ge=0.05, le=30.0)

    @field_validator("aliases")
    @classmethod
    def _weights(cls, aliases: dict) -> dict:
        return _check_weights("aliases", aliases)

    def decode_limits(self) -> Limits:
        """What a decode of one upload may produce and take."""
        return Limits(self.max_duration_s, self.min_duration_s, self.max_decoded_bytes,
                      self.max_decode_s)

    def check_against(self, variants: list[str]) -> None:
        if self.default_version not in variants and self.default_version not in self.aliases:
            raise ValueError(f"default_version {self.default_version!r} is not one of {variants}"
                             f" nor an alias")
        for alias, target in self.aliases.items():
            for name in [target] if isinstance(target, str) else target:
                if name not in variants:
                    raise ValueError(f"alias {alias!r} points to {name!r}, not one of {variants}")
            if alias in variants:
                raise ValueError(f"alias {alias!r} hides the variant of the same name")
        for primary, target in self.shadow.items():
            for field, name in (("", primary), (f".{primary}", target)):
                if name not in variants:
                    raise ValueError(f"shadow{field}: {name!r} is not one of {variants}")
            if primary == target:
                raise ValueError(f"shadow.{primary}: a variant cannot shadow itself")


BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _custom_resources(value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if name in BUILTIN_RESOURCES or name.startswith("node:"):
            raise ValueError(f"resource {name!r} is not a custom resource (use num_cpus/num_gpus)")
        if amount <= 0:
            raise ValueError(f"resource {name!r}: ask for more than 0")
    return value


# Custom resources (`ray start --resources`, KubeRay's rayStartParams): a deployment asking for
# one lands only on the nodes that offer it.
CustomResources = Annotated[dict[str, float], AfterValidator(_custom_resources)]


class VariantResources(_Strict):
    """What one replica of a variant asks Ray for (changing it restarts replicas)."""

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    resources: CustomResources = Field(default_factory=dict)

    def demand(self) -> dict[str, float]:
        """What one replica needs from the node it lands on, zeros left out."""
        wanted = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {name: amount for name, amount in wanted.items() if amount > 0}


# Ray gives the head node this resource (1 of it): a replica asking for a sliver lands there.
HEAD_RESOURCE = "node:__internal_head__"
HEAD_SLIVER = 0.001


class AppArgs(_Strict):
    """The application builder's args."""

    variants: dict[str, VariantResources]
    router_num_cpus: float = Field(default=0.25, ge=0)
    # Custom resources for the Router, e.g. to keep it (and output_dir) on one node.
    router_resources: CustomResources = Field(default_factory=dict)
    # The VAD's deployment (POST /v1/segments without given segments, the stream's utterance
    # events): about 0.1-0.5 s of one CPU per minute of audio. None: not deployed (then
    # those need given segments).
    vad_num_cpus: float | None = Field(default=0.1, ge=0)
    # Router replicas (set here, not as the Router's num_replicas in `deployments`: the
    # resource check counts them) and where they run (docs/high-availability.md):
    # "head": beside a HeadOnly proxy, so losing a worker never takes the router;
    # "spread": at most one per node, so losing a node takes at most one;
    # "any": wherever Ray finds room.
    router_replicas: int = Field(default=1, ge=1, le=64)
    router_placement: Literal["head", "spread", "any"] = "any"
    # Off for autoscaling clusters (KubeRay) where GPUs appear on demand.
    check_resources: bool = True

    @model_validator(mode="after")
    def _names(self) -> AppArgs:
        if not self.variants:
            raise ValueError("variants: name at least one variant")
        for name in self.variants:
            if not VARIANT_NAME.fullmatch(name) or name == ROUTER_NAME:
                raise ValueError(f"variant name {name!r}: use lowercase letters, digits, - and _")
        return self

    def router_demand(self) -> dict[str, float]:
        """What one Router replica asks of its node (the head's own resource for "head")."""
        demand = VariantResources(num_cpus=self.router_num_cpus,
                                  resources=self.router_resources).demand()
        if self.router_placement == "head":
            demand[HEAD_RESOURCE] = HEAD_SLIVER
        return demand

    def router_options(self) -> dict:
        """The Router deployment's options: its replicas, their resources and placement."""
        resources = {k: v for k, v in self.router_demand().items() if k != "CPU"}
        options = {"num_replicas": self.router_replicas,
                   "ray_actor_options": {"num_cpus": self.router_num_cpus,
                                         "resources": resources}}
        if self.router_placement == "spread":
            options["max_replicas_per_node"] = 1
        return options

    def demands(self) -> dict[str, dict[str, float]]:
        """One replica of every deployment: deployment name -> what it needs from its node."""
        vad = {} if self.vad_num_cpus is None else {
            VAD_NAME: VariantResources(num_cpus=self.vad_num_cpus).demand()}
        return {ROUTER_NAME: self.router_demand(), **vad,
                **{name: res.demand() for name, res in self.variants.items()}}

    def replicas(self) -> dict[str, int]:
        """How many replicas of every deployment the builder asks for."""
        vad = {} if self.vad_num_cpus is None else {VAD_NAME: 1}
        return {ROUTER_NAME: self.router_replicas, **vad, **dict.fromkeys(self.variants, 1)}
