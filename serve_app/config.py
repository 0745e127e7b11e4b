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
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.routing import RoutingTable

VARIANT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ROUTER_NAME = "Router"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerateSpec(_Strict):
    """Write a random-weight checkpoint at `source` when it is missing (offline configs)."""

    arch: Literal["tiny", "base", "large"]
    seed: int = 0


class ModelSettings(_Strict):
    """A variant deployment's user_config: which model it serves and how."""

    source: str = Field(description="local model directory, or a hub id such as "
                                    "iic/emotion2vec_plus_large")
    hub: Literal["ms", "hf"] = "ms"
    revision: str | None = None
    generate: GenerateSpec | None = None
    # mmap: build FunASR's Emotion2vec on the meta device and map model.pt into it (~1x its
    # size at peak); funasr: AutoModel's own path (~3x). Hub ids always load through AutoModel.
    loader: Literal["mmap", "funasr"] = "mmap"
    # reduced: bfloat16 autocast on CPU, float16 autocast on CUDA (what "turbo" means).
    precision: Literal["fp32", "reduced"] = "fp32"
    threads: int | None = Field(default=None, ge=1, le=256,
                                description="torch threads; default: the replica's CPUs")
    warmup_s: float = Field(default=1.0, ge=0.05, le=30.0)
    max_audio_s: float = Field(default=600.0, gt=0, description="refuse longer arrays")
    # Longer clips run in windows of this length (their frames are pooled together): bounds
    # memory and cost. Up to it, results equal FunASR's on the whole clip.
    window_s: float = Field(default=30.0, ge=1.0, le=600.0)
    # Dynamic batching (serve.batch): 1 = off. A batch runs as one padded forward pass whose
    # per-clip results equal single-clip inference; it is also capped by total audio seconds.
    max_batch_size: int = Field(default=1, ge=1, le=64)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0, le=1.0)
    max_batch_audio_s: float = Field(default=120.0, gt=0)
    idle_unload_s: float = Field(default=0.0, ge=0,
                                 description="release the model after this long unused; 0: never")
    # granularity=frame timeline: scores of frames pooled over windows (serve_app/timeline.py)
    timeline_window_s: float = Field(default=1.0, ge=0.02, le=60.0)
    timeline_hop_s: float = Field(default=0.5, ge=0.02, le=60.0)

    @field_validator("source")
    @classmethod
    def _source_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("source must name a model directory or a hub id")
        return value.strip()

    def load_key(self) -> tuple:
        """The settings that need a model load when they change; the others apply live."""
        return (self.source, self.hub, self.revision, self.generate, self.loader,
                self.precision, self.threads, self.warmup_s)

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


class RouterSettings(_Strict):
    """The Router deployment's user_config."""

    default_version: str = "large"
    # alias -> a variant, or a weighted set {variant: weight} that splits the requests by
    # weight, sticky per X-Session-Key (serve_app/routing.py). Weights are normalised.
    aliases: dict[str, str | dict[str, float]] = Field(default_factory=dict)
    # primary variant -> shadow variant: every request the primary answered is also sent to
    # the shadow in the background and the answers compared (serve_app/shadow.py).
    shadow: dict[str, str] = Field(default_factory=dict)
    shadow_timeout_s: float = Field(default=30.0, gt=0, description="wait on a shadow variant")
    shadow_max_pending: int = Field(default=8, ge=1, le=1024,
                                    description="shadow calls in flight; beyond: dropped")
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_duration_s: float = Field(default=120.0, gt=0)
    # The conv stem needs 400 samples (25 ms) at 16 kHz; below 0.1 s there is no emotion.
    min_duration_s: float = Field(default=0.1, ge=0.025)
    model_timeout_s: float = Field(default=60.0, gt=0, description="wait on a variant")
    output_dir: str | None = Field(default=None, description="save each result here")

    @field_validator("aliases")
    @classmethod
    def _weights(cls, aliases: dict) -> dict:
        for alias, target in aliases.items():
            if isinstance(target, str):
                continue
            if not target:
                raise ValueError(f"aliases.{alias}: name at least one variant with a weight")
            for variant, weight in target.items():
                if not math.isfinite(weight) or weight < 0:
                    raise ValueError(f"aliases.{alias}.{variant}: weight {weight} must be a "
                                     "finite number >= 0")
            if not any(weight > 0 for weight in target.values()):
                raise ValueError(f"aliases.{alias}: give at least one variant a weight above 0")
        return aliases

    def resolve(self, requested: str | None, variants: list[str]) -> str | None:
        """The variant for a requested model_version (alias or name), or None if unknown."""
        route = RoutingTable(self.default_version, self.aliases, variants).resolve(requested)
        return route.variant if route else None

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


class VariantResources(_Strict):
    """What one replica of a variant asks Ray for (changing it restarts replicas)."""

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)


class AppArgs(_Strict):
    """The application builder's args."""

    variants: dict[str, VariantResources]
    router_num_cpus: float = Field(default=0.25, ge=0)
    # Off for autoscaling clusters (KubeRay) where GPUs appear on demand.
    check_resources: bool = True

    @model_validator(mode="after")
    def _names(self) -> "AppArgs":
        if not self.variants:
            raise ValueError("variants: name at least one variant")
        for name in self.variants:
            if not VARIANT_NAME.match(name) or name == ROUTER_NAME:
                raise ValueError(f"variant name {name!r}: use lowercase letters, digits, - and _")
        return self
