"""No single point of failure in the request path (docs/high-availability.md), on several Ray
nodes on 127.0.0.1: two Router replicas spread over two workers, a key's quota held across
them, and the worker that holds a Router replica and a variant lost under load.

One cluster for the module (benchmarks/ha.py lays it out): a head with the proxy only, two
workers that each hold a Router slot and a model slot, and a spare worker added once the app
runs, for the variant that loses its node."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from benchmarks.ha import (
    APP,
    FAST_NODE_DEATH,
    HEAD,
    VARIANTS,
    WORKER,
    Keys,
    Load,
    accepted_per_minute,
    ha_app,
    lose_a_router_node,
    router_nodes,
    variants,
)
from serve_app.tools.cluster import local_cluster
from tests import clips as clip_maker

QUOTA_RPM = 120


@pytest.fixture(scope="module")
def ha(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    clip = clip_maker.write(tmp_path_factory.mktemp("clips") / "tone.wav",
                            clip_maker.tone(2.0, 16_000), 16_000)
    keys = Keys(QUOTA_RPM)
    with local_cluster(HEAD, [WORKER, WORKER], system_config=FAST_NODE_DEATH) as serve:
        serve.put(ha_app(root, 2, keys))
        status = serve.wait_for(APP, ("RUNNING", "DEPLOY_FAILED"))
        assert status.status == "RUNNING", status
        serve.nodes.add_node(node_ip_address="127.0.0.1", include_dashboard=False, **WORKER)
        yield serve, keys, clip


def test_two_router_replicas_on_two_nodes(ha):
    serve, keys, _ = ha
    routers = router_nodes()
    workers = {node.node_id for node in serve.nodes.worker_nodes}
    assert len(routers) == 2 and len(set(routers.values())) == 2, routers
    assert set(routers.values()) <= workers  # the head holds the proxy only
    with httpx.Client(base_url=serve.url, timeout=30) as http:
        placed = {info["node"]["id"] for info in variants(http, keys).values()}
    assert placed == set(routers.values())  # a Router and a variant on each worker


def test_a_key_quota_holds_across_two_routers(ha):
    """Two Routers, a key of 120 requests a minute asked ~10 times that: what is admitted over
    30 s, once the first burst is spent, is within 20 % of the quota (each Router alone would
    admit it twice: tests/test_quota_share.py)."""
    serve, keys, _ = ha
    result = accepted_per_minute(serve.url, keys, seconds=30)
    assert 0.8 <= result["ratio"] <= 1.2, result
    assert not result["other"], result


def test_the_node_of_a_router_lost_under_load(ha):
    """Every request is answered: 200, or 503 with Retry-After, never a plain 500; no client
    hangs or sees its connection dropped; the variant on the lost node serves again from the
    spare node, and one Router is left."""
    serve, keys, clip = ha
    spare = {node.node_id for node in serve.nodes.worker_nodes} - set(router_nodes().values())
    with Load(serve.url, clip, keys, clients=4) as load:
        loss = lose_a_router_node(serve, load, keys)
    assert not load.errors, load.errors
    statuses = Counter((a.status, a.code) for a in load.answers)
    assert {status for status, _ in statuses} <= {200, 503}, statuses
    assert all(a.retry_after for a in load.answers if a.status == 503), statuses
    assert statuses[(200, None)] > 0 and loss["routers_left"] >= 1, loss
    assert set(loss["lost_node_held"]) >= {"Router", "base"}, loss
    with httpx.Client(base_url=serve.url, timeout=30) as http:
        infos = variants(http, keys)
    assert infos["base"]["node"]["id"] in spare, infos
    # Both variants answered after the loss.
    after = {a.variant for a in load.answers if a.status == 200}
    assert after == set(VARIANTS)

