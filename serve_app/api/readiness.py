"""One readiness rule for every probe (`/ready`, `/ready?variant=`, KServe's `/v2/health/ready`
and `/v2/models/{name}/ready`). Pure logic over the variants' states (serve_app/inference/
lifecycle.py, and serve_app/api/variant_client.py for `scaled_to_zero`).

A variant *can serve* when a request to it gets an answer: ready, swapping (the old model
serves until the new one is in), unloading or unloaded by idle release (the next request loads
it again and waits), loading again after such a release (its requests wait), scaled to zero
(the next request starts a replica). It cannot while it loads for the first time or waits for
its config, nor once it failed with no model.

The pod is ready when it can serve requests: no variant is still starting, and at least one
can serve. A variant that failed alone makes only its own requests 503, not the pod: taking
every pod out of a Service for one broken variant (or during a hot swap slower than the
probe's threshold) would be an outage the service promises not to have.
"""

from __future__ import annotations

from collections.abc import Mapping

CAN_SERVE = frozenset({"ready", "swapping", "unloading", "unloaded", "scaled_to_zero"})
STARTING = frozenset({"loading", "waiting_for_config"})
RETRY_AFTER_S = 5


def can_serve(info: Mapping) -> bool:
    """A variant's /v1/models entry (its state, and load_count where a replica answered)."""
    state = info.get("state")
    reloading = state == "loading" and (info.get("load_count") or 0) > 0
    return state in CAN_SERVE or reloading


def pod_ready(infos: Mapping[str, Mapping]) -> bool:
    """Whether the pod can serve requests (see the module docstring)."""
    starting = any(info.get("state") in STARTING and not can_serve(info)
                   for info in infos.values())
    return not starting and any(can_serve(info) for info in infos.values())


def all_can_serve(infos: Mapping[str, Mapping]) -> bool:
    """The strict view, for one variant or a model name's variants: every one can serve."""
    return bool(infos) and all(can_serve(info) for info in infos.values())


def not_ready_headers(ready: bool) -> dict[str, str] | None:
    return None if ready else {"Retry-After": str(RETRY_AFTER_S)}
