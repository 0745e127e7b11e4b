"""What a batch job computes, read from a Serve config: the variant a model_version names, that
deployment's user_config (so the job computes what the service computes), the Router's
decoding limits, and a custom head from its heads_dir. No Ray, no torch: unit-tested on its own."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from serve_app.audio.waveform import Limits
from serve_app.config import (
    ROUTER_NAME,
    AppArgs,
    ModelSettings,
    RouterSettings,
    SegmentSettings,
    without_inputs,
)
from serve_app.errors import ApiError
from serve_app.heads.headfile import Head, InvalidHead, UnknownHead, parse_reference
from serve_app.heads.registry import HeadRegistry
from serve_app.tools.cluster import load_app
from serve_app.traffic.routing import RoutingTable


class PlanError(ValueError):
    """The config or the flags do not describe a job that can run."""


@dataclass(frozen=True)
class JobPlan:
    variant: str
    model: ModelSettings      # the variant's user_config; max_batch_size as the job runs it
    limits: Limits            # the Router's decoding limits (raised by flags)
    max_upload_bytes: int     # files larger than this are error rows, never read
    decode_workers: int       # the Router's: FFmpeg in worker processes (0: in the thread)
    segments: SegmentSettings  # the Router's, for --by-segment (VAD, recording limits)
    head: Head | None = None   # --head: a custom head from the Router's heads_dir
    labels: tuple[str, ...] | None = None  # a label set: the softmax over these alone

    @property
    def recording_limits(self) -> Limits:
        """--by-segment decodes whole recordings, as POST /v1/segments does."""
        return self.segments.decode_limits(self.limits)

    @property
    def max_padded_samples(self) -> int:
        """A padded pass holds at most this many samples (clips x the longest)."""
        return int(self.model.max_batch_audio_s * 16_000)


def _validate(model, values: dict, what: str):
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise PlanError(f"{what}: {without_inputs(exc)}") from None


def plan_job(config_path: str | Path, model_version: str | None = None, *,
             batch_size: int | None = None, max_duration_s: float | None = None,
             max_upload_bytes: int | None = None,
             max_decoded_bytes: int | None = None, head: str | None = None) -> JobPlan:
    """The job for `model_version` (a variant or plain alias; None: the config's default)
    of the config's single application. The flags given (not None) override the Router's
    limits and the variant's batch size."""
    try:
        app = load_app(config_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"cannot read the application from {config_path}: {exc!r}") from None
    args = _validate(AppArgs, app.get("args") or {}, f"{config_path}: args")
    variants = list(args.variants)
    user_configs = {d.get("name"): d.get("user_config") for d in app.get("deployments") or []}
    router_config = user_configs.get(ROUTER_NAME)
    # As the Router starts: its first variant is the default until a user_config says more.
    router = _validate(RouterSettings, router_config if router_config is not None
                       else {"default_version": variants[0]}, f"{config_path}: Router")
    try:
        router.check_against(variants)
    except ValueError as exc:
        raise PlanError(f"{config_path}: {exc}") from None
    name = model_version or router.default_version
    target = router.aliases.get(name)
    if isinstance(target, dict):
        raise PlanError(f"{name!r} splits requests between {sorted(target)} by weight; a job "
                        "scores every file with one model: name one of them")
    route = RoutingTable(router.default_version, router.aliases, variants).resolve(name)
    if route is None:
        raise PlanError(f"unknown model_version {name!r}; valid: "
                        f"{RoutingTable(router.default_version, router.aliases, variants).names}")
    model_config = user_configs.get(route.variant)
    if not model_config:
        raise PlanError(f"{config_path}: the deployment {route.variant!r} has no user_config: "
                        "its model is not configured there")
    overrides = {key: value for key, value in (
        ("max_duration_s", max_duration_s), ("max_upload_bytes", max_upload_bytes),
        ("max_decoded_bytes", max_decoded_bytes)) if value is not None}
    router = _validate(RouterSettings, {**router.model_dump(), **overrides}, "the limits")
    return job_plan(router, route.variant, model_config, batch_size=batch_size,
                    head=_head(router, head) if head else None)


def job_plan(router: RouterSettings, variant: str, model_config: dict, *,
             batch_size: int | None = None, head: Head | None = None,
             labels: tuple[str, ...] | None = None) -> JobPlan:
    """The job of `variant` (its user_config `model_config`) under the Router's limits:
    `batch` builds it from a config file, a job over HTTP from the running Router's settings
    and the variant's settings in effect."""
    model_values = dict(model_config)
    if batch_size is not None:
        model_values["max_batch_size"] = batch_size
    # A raised duration limit raises the variant's own array limit with it: one limit, not two.
    if router.max_duration_s > model_values.get("max_audio_s", ModelSettings.model_fields[
            "max_audio_s"].default):
        model_values["max_audio_s"] = math.ceil(router.max_duration_s)
    model = _validate(ModelSettings, model_values, f"the {variant} user_config")
    limits = Limits(router.max_duration_s, router.min_duration_s, router.max_decoded_bytes,
                    router.max_decode_s)
    return JobPlan(variant, model, limits, router.max_upload_bytes, router.decode_workers,
                   router.segments, head, labels)


def _head(router: RouterSettings, requested: str) -> Head:
    """--head: a head alias naming one revision, or NAME[@REV], read from heads_dir."""
    target = router.heads.aliases.get(requested, requested)
    if isinstance(target, dict):
        raise PlanError(f"head alias {requested!r} splits requests between {sorted(target)} by "
                        "weight; a job scores every file with one head: name one of them")
    try:
        return HeadRegistry(router.heads_dir, router.heads.max_head_bytes).read(
            *parse_reference(target))
    except (ApiError, UnknownHead, InvalidHead, OSError) as exc:
        message = exc.message if isinstance(exc, ApiError) else str(exc)
        raise PlanError(f"--head {requested}: {message}") from None
