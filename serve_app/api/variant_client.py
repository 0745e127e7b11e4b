"""Calling the variant deployments from the ingress: one prediction with a deadline, a retry
when a replica dies under it, Serve's errors mapped to API errors; and each variant's state.
No torch here: an InferenceRequest goes out, a VariantAnswer comes back (serve_app/wire.py)."""

from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray import serve
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle

from serve_app.api.protocol import VariantInfo
from serve_app.errors import ApiError, InvalidInput
from serve_app.heads.headfile import HeadBackboneMismatch, InvalidHead, UnknownHead
from serve_app.labels import UnknownLabel, select
from serve_app.wire import InferenceRequest, VariantAnswer

logger = logging.getLogger("ray.serve")


def task_error(variant: str, exc: ray.exceptions.RayTaskError) -> Exception:
    """What a variant's exception (Ray's `cause`) means here: InvalidInput is the client's
    422; a replica lost under the call is re-raised for the retry; anything else is 503."""
    cause = exc.cause
    if isinstance(cause, (UnknownLabel, UnknownHead, InvalidHead, HeadBackboneMismatch)):
        return cause.api_error()
    if isinstance(cause, InvalidInput):
        return ApiError(422, "invalid_audio", str(cause))
    if isinstance(cause, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return cause
    logger.error("variant %s failed: %s", variant, exc)
    return ApiError(503, "model_error", f"variant {variant} failed on this request",
                    headers={"Retry-After": "1"})


def _state_only(name: str, state: str, error: str | None = None) -> dict:
    """A variant's /v1/models entry when no replica answers for it: Serve's view alone."""
    return VariantInfo(variant=name, state=state, error=error).model_dump()


class Variants:
    """The variant deployments' handles, by name."""

    def __init__(self, handles: dict[str, DeploymentHandle]):
        self.handles = handles

    @property
    def names(self) -> list[str]:
        return list(self.handles)

    async def predict(self, variant: str, request: InferenceRequest,
                      timeout_s: float) -> VariantAnswer:
        """The variant's answer, or an ApiError (503 unavailable/overloaded, 504, 422)."""
        deadline = time.monotonic() + timeout_s
        for attempt in (1, 2):
            try:
                return await self._predict_once(variant, request,
                                                 max(0.1, deadline - time.monotonic()))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                # The replica died under the request. Inference has no side effects, so one
                # retry on another (or the restarted) replica is safe.
                logger.warning("variant %s: replica lost (attempt %d): %s", variant, attempt, exc)
                if attempt == 2 or time.monotonic() > deadline - 1:
                    raise ApiError(503, "model_unavailable",
                                   f"variant {variant} is unavailable; retry",
                                   headers={"Retry-After": "2"}) from None
                await asyncio.sleep(0.5)
        raise AssertionError("unreachable")

    async def _predict_once(self, variant: str, request: InferenceRequest,
                            timeout_s: float) -> VariantAnswer:
        response = self.handles[variant].predict.remote(request)
        try:
            return await asyncio.wait_for(response, timeout=timeout_s)
        except TimeoutError:
            response.cancel()
            raise ApiError(504, "model_timeout",
                           f"variant {variant} did not answer within {timeout_s:g} s") from None
        except BackPressureError:
            raise ApiError(503, "overloaded", f"variant {variant} is at capacity; retry later",
                           headers={"Retry-After": "1"}) from None
        except ray.exceptions.RayTaskError as exc:
            raise task_error(variant, exc) from None

    async def settings(self, name: str, timeout_s: float = 30.0) -> dict:
        """The user_config the variant serves, for a job that loads the same model in engines
        of its own; 503 while no replica answers."""
        try:
            settings = await asyncio.wait_for(self.handles[name].settings.remote(), timeout_s)
        except Exception as exc:  # a replica starting, failed, or gone
            raise ApiError(503, "model_unavailable", f"variant {name} cannot say its model "
                           f"now: {type(exc).__name__}", headers={"Retry-After": "5"}) from None
        if settings is None:
            raise ApiError(503, "model_unavailable", f"variant {name} has no model "
                           "configured", headers={"Retry-After": "5"})
        return settings

    async def _info(self, name: str, deployments: dict) -> dict:
        status = deployments.get(name)
        if status is not None and status.status in ("HEALTHY", "DOWNSCALING") and \
                not status.replica_states.get("RUNNING"):
            # Autoscaled to zero replicas: asking one would start one.
            return _state_only(name, "scaled_to_zero")
        try:
            return await asyncio.wait_for(self.handles[name].info.remote(), timeout=2.0)
        except Exception:
            failed = status is not None and status.status in ("UNHEALTHY", "DEPLOY_FAILED")
            return _state_only(name, "failed" if failed else "loading",
                               status.message if status is not None and failed else None)

    async def check_labels(self, name: str, requested: tuple[str, ...] | None) -> None:
        """Refuse a label set the variant's head lacks before any audio arrives (a stream
        would otherwise learn it at its first window, which still checks); skipped while no
        replica answers within 2 s."""
        if requested is None:
            return
        labels = (await self._info(name, {})).get("labels")  # none while loading
        try:
            if labels:
                select(requested, labels)
        except UnknownLabel as exc:
            raise exc.api_error() from None

    async def states(self) -> dict[str, str]:
        """Each variant's state (serve_app/api/readiness.py says which can serve)."""
        return {name: info["state"] for name, info in (await self.info()).items()}

    async def info(self) -> dict[str, dict]:
        """Each variant's info() from a replica, or its state from Serve's status (none
        outside a Serve replica: the handles' own answers)."""
        try:
            app_name = serve.get_replica_context().app_name
        except RayServeException:
            app_name = None
        try:
            status = await asyncio.to_thread(serve.status) if app_name else None
            deployments = status.applications[app_name].deployments if status else {}
        except Exception as exc:
            logger.warning("serve.status() failed: %r", exc)
            deployments = {}
        infos = await asyncio.gather(*(self._info(n, deployments) for n in self.handles))
        return dict(zip(self.handles, infos))
