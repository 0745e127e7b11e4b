"""The one readiness rule (serve_app/api/readiness.py), on its own."""

from __future__ import annotations

import pytest

from serve_app.api import readiness


def infos(**states) -> dict[str, dict]:
    """Entries as /v1/models gives them: a replica's (state, load_count) or Serve's state."""
    return {name: {"state": state[0], "load_count": state[1]} if isinstance(state, tuple)
            else {"state": state} for name, state in states.items()}


@pytest.mark.parametrize("variants, ready", [
    (infos(base="ready", large="ready"), True),
    (infos(base="ready", large="swapping"), True),          # the old model still serves
    (infos(base="unloaded", large="unloading"), True),      # idle release: reloads on demand
    (infos(base=("loading", 1), large="ready"), True),      # reloading after a release
    (infos(base="scaled_to_zero", large="ready"), True),    # a request starts a replica
    (infos(base="failed", large="ready"), True),            # only base's own requests fail
    (infos(base="loading", large="ready"), False),          # the pod is still starting
    (infos(base=("loading", 0), large="ready"), False),     # its first load
    (infos(base="waiting_for_config", large="ready"), False),
    (infos(base="failed", large="failed"), False),          # nothing can serve
    ({}, False),
])
def test_the_pod_is_ready_when_it_can_serve(variants, ready):
    assert readiness.pod_ready(variants) is ready
    assert (readiness.not_ready_headers(ready) is None) is ready


@pytest.mark.parametrize("state, ready", [("ready", True), ("swapping", True),
                                          ("unloaded", True), ("scaled_to_zero", True),
                                          (("loading", 2), True), ("loading", False),
                                          ("failed", False)])
def test_one_variant_is_ready_when_it_can_serve(state, ready):
    assert readiness.all_can_serve(infos(large=state)) is ready
