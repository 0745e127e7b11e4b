"""The one readiness rule (serve_app/api/readiness.py), on its own."""

from __future__ import annotations

import pytest

from serve_app.api import readiness


@pytest.mark.parametrize("states, ready", [
    ({"base": "ready", "large": "ready"}, True),
    ({"base": "ready", "large": "swapping"}, True),         # the old model still serves
    ({"base": "unloaded", "large": "unloading"}, True),     # idle release: reloads on demand
    ({"base": "scaled_to_zero", "large": "ready"}, True),   # a request starts a replica
    ({"base": "failed", "large": "ready"}, True),           # only base's own requests fail
    ({"base": "loading", "large": "ready"}, False),         # the pod is still starting
    ({"base": "waiting_for_config", "large": "ready"}, False),
    ({"base": "failed", "large": "failed"}, False),         # nothing can serve
    ({}, False),
])
def test_the_pod_is_ready_when_it_can_serve(states, ready):
    assert readiness.pod_ready(states) is ready
    assert (readiness.not_ready_headers(ready) is None) is ready


@pytest.mark.parametrize("state, ready", [("ready", True), ("swapping", True),
                                          ("unloaded", True), ("scaled_to_zero", True),
                                          ("loading", False), ("failed", False)])
def test_one_variant_is_ready_when_it_can_serve(state, ready):
    assert readiness.all_can_serve({"large": state}) is ready
