"""Configs that ask for GPUs the cluster lacks fail at deploy time, naming the fix."""

from __future__ import annotations

import pytest

from serve_app.app import ResourceError, check_resources
from serve_app.config import HEAD_RESOURCE, AppArgs
from serve_app.tools.cluster import load_app
from tests.conftest import REPO


@pytest.mark.parametrize("config", ["deploy.yaml", "configs/single-gpu.yaml"])
def test_gpu_configs_name_the_fix_on_a_cpu_node(config):
    args = AppArgs.model_validate(load_app(REPO / config)["args"])
    with pytest.raises(ResourceError, match=r"GPUs.*configs/cpu\.yaml"):
        check_resources(args, [{"CPU": 2.0, HEAD_RESOURCE: 1.0}])


# The check above, where it runs: in the builder, on a deploy to a running CPU cluster
# (single-gpu.yaml's refusal comes from the same check: its arithmetic is above).
@pytest.mark.parametrize("config", ["deploy.yaml"])
def test_gpu_config_fails_fast_on_a_cpu_cluster(service, config):
    cluster = service.cluster
    before = cluster_pids(service)
    gpu_app = load_app(REPO / config)
    gpu_app.update(name="gpu", route_prefix="/gpu")
    cluster.put(gpu_app)
    try:
        status = cluster.wait_for("gpu", ("DEPLOY_FAILED", "RUNNING"), timeout_s=120)
        assert status.status == "DEPLOY_FAILED"
        assert "GPUs" in status.message and "configs/cpu.yaml" in status.message
    finally:
        cluster.remove("gpu")
    # The running app was left alone.
    assert cluster.wait_for("emotion2vec", ("RUNNING",)).status == "RUNNING"
    assert cluster_pids(service) == before


def cluster_pids(service):
    import httpx

    variants = httpx.get(f"{service.url}/v1/models", timeout=30).json()["variants"]
    return {name: info["pid"] for name, info in variants.items()}


def test_check_resources_names_the_fix():
    args = AppArgs.model_validate({"variants": {"base": {"num_cpus": 1, "num_gpus": 1},
                                                "large": {"num_cpus": 1, "num_gpus": 1}}})
    check_resources(args, [{"CPU": 8, "GPU": 2}])
    with pytest.raises(ResourceError, match=r"2 GPUs .* cluster has 1\b.*single-gpu.yaml"):
        check_resources(args, [{"CPU": 8, "GPU": 1}])
    with pytest.raises(ResourceError, match=r"2.35 CPUs but the cluster has 2\b.*threads"):
        check_resources(args, [{"CPU": 2, "GPU": 2}])  # router 0.25, VAD 0.1, 2 variants


def test_check_resources_counts_every_node_and_each_replica_needs_one():
    """Totals over the nodes, custom resources included; and each replica on a single node."""
    args = AppArgs.model_validate({
        "variants": {"base": {"num_cpus": 1, "num_gpus": 1, "resources": {"gpu_pod": 1}},
                     "large": {"num_cpus": 1, "num_gpus": 1, "resources": {"gpu_pod": 1}}},
        "router_num_cpus": 1, "vad_num_cpus": None})  # no VAD deployment: 3 CPUs in all
    gpu_node = {"CPU": 1, "GPU": 1, "gpu_pod": 1}
    check_resources(args, [{"CPU": 1}, gpu_node, gpu_node])  # fits only across three nodes
    with pytest.raises(ResourceError, match=r"2 GPUs .* cluster has 1\b"):
        check_resources(args, [{"CPU": 8}, gpu_node])
    with pytest.raises(ResourceError, match=r"2 of the custom resource 'gpu_pod' .* offer 1\b"):
        check_resources(args, [{"CPU": 8}, gpu_node, {"CPU": 1, "GPU": 1}])
    # Enough in total, but no node holds a whole replica: it would stay pending forever.
    with pytest.raises(ResourceError, match=r"one base replica asks for \{CPU: 1, GPU: 1, "
                                            r"gpu_pod: 1\} but no single node"):
        check_resources(args, [{"CPU": 3}, {"GPU": 1, "gpu_pod": 1}, {"GPU": 1, "gpu_pod": 1}])


def test_check_resources_counts_every_router_replica_and_its_placement():
    def args(replicas: int, placement: str) -> AppArgs:  # no VAD: the Routers' CPUs alone
        return AppArgs.model_validate({"variants": {"base": {"num_cpus": 1}},
                                       "router_num_cpus": 1, "router_replicas": replicas,
                                       "router_placement": placement, "vad_num_cpus": None})

    head = {"CPU": 2, HEAD_RESOURCE: 1.0}
    spread = args(2, "spread")
    check_resources(spread, [{"CPU": 2}, {"CPU": 1}])
    with pytest.raises(ResourceError, match=r"ask for 3 CPUs but the cluster has 2\b"):
        check_resources(spread, [{"CPU": 2}])  # enough for one Router, not two
    with pytest.raises(ResourceError, match=r"spread puts the 2 Router replicas on 2 different "
                                            r"nodes, but 1 node\(s\) can hold one"):
        check_resources(spread, [{"CPU": 8}, {"CPU": 0.5}])
    on_head = args(2, "head")
    check_resources(on_head, [head, {"CPU": 1}])
    with pytest.raises(ResourceError, match=r"head puts the 2 Router replica\(s\) on the head "
                                            r"node, which cannot hold 2 x \{CPU: 1\}"):
        check_resources(on_head, [{**head, "CPU": 1}, {"CPU": 8}])
    # What the builder asks Serve for.
    assert spread.router_options() == {
        "num_replicas": 2, "max_replicas_per_node": 1,
        "ray_actor_options": {"num_cpus": 1, "resources": {}}}
    assert on_head.router_options()["ray_actor_options"]["resources"] == {HEAD_RESOURCE: 0.001}
    assert "max_replicas_per_node" not in args(1, "any").router_options()


def test_router_placement_of_the_shipped_configs():
    """Production: two Router replicas on two nodes; offline: the Router beside the proxy."""
    for path, replicas, placement in [("deploy.yaml", 2, "spread"),
                                      ("configs/cpu.yaml", 1, "head"),
                                      ("configs/single-gpu.yaml", 1, "head"),
                                      ("configs/tiny.yaml", 1, "head")]:
        args = AppArgs.model_validate(load_app(REPO / path)["args"])
        assert (args.router_replicas, args.router_placement) == (replicas, placement), path
        router = next(d for d in load_app(REPO / path)["deployments"] if d["name"] == "Router")
        assert "num_replicas" not in router and "max_replicas_per_node" not in router, path


def test_every_shipped_config_is_valid():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve_app.config import ModelSettings, RouterSettings

    for path in ["deploy.yaml", "configs/cpu.yaml", "configs/single-gpu.yaml",
                 "configs/tiny.yaml"]:
        ServeDeploySchema.model_validate(yaml.safe_load((REPO / path).read_text()))
        app = load_app(REPO / path)
        args = AppArgs.model_validate(app["args"])
        deployments = {d["name"]: d for d in app["deployments"]}
        assert set(deployments) == {"Router", *args.variants}, path
        router = RouterSettings.model_validate(deployments["Router"]["user_config"])
        router.check_against(list(args.variants))
        # The production configs need API keys; the local ones are open.
        assert bool(router.api_keys or router.api_keys_file) == (
            path in ("deploy.yaml", "configs/single-gpu.yaml")), path
        for name in args.variants:
            ModelSettings.model_validate(deployments[name]["user_config"])


def test_grafana_dashboard_charts_only_metrics_the_service_exports():
    """Every metric the dashboard queries is one the service records, and every one it
    records is charted."""
    import json
    import re

    dashboard = json.loads((REPO / "configs" / "grafana" / "emotion2vec-dashboard.json")
                           .read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"ray_(emotion2vec_[a-z_]+?)(?:_bucket|_sum|_count)?\b",
                                      target["expr"])}
    source = (REPO / "serve_app" / "metrics.py").read_text()
    recorded = set(re.findall(r'"(emotion2vec_[a-z_]+)"', source))
    assert queried == recorded, (queried ^ recorded)


@pytest.mark.parametrize("path", ["deploy.yaml", "configs/cpu.yaml", "configs/single-gpu.yaml",
                                  "configs/tiny.yaml"])
def test_every_shipped_config_ends_streams_before_the_proxy_would(path):
    """Ray Serve's proxy bounds every request, a WebSocket session included, by
    http_options.request_timeout_s from its start, and then drops the connection without a
    close frame. A stream must end (with an error event) first; and the open streams, each
    one of the router's ongoing requests, must leave room for plain HTTP requests."""
    import yaml

    from serve_app.api.stream_protocol import PROXY_MARGIN_S, session_limit_s
    from serve_app.config import RouterSettings

    config = yaml.safe_load((REPO / path).read_text())
    timeout = config["http_options"]["request_timeout_s"]
    router = next(d for d in load_app(REPO / path)["deployments"] if d["name"] == "Router")
    settings = RouterSettings.model_validate(router["user_config"])
    assert settings.stream_max_session_s <= timeout - PROXY_MARGIN_S
    assert session_limit_s(settings.stream_max_session_s, timeout, {}) == \
        settings.stream_max_session_s
    # A real-time stream of the longest audio allowed fits in its session.
    assert min(settings.stream_max_s, settings.max_duration_s) < settings.stream_max_session_s
    assert settings.max_streams < router["max_ongoing_requests"]


def test_every_documented_start_runs_the_replay_middleware():
    """The image (every KubeRay pod), the Makefile and the README's production commands start
    Ray with the proxy's replay middleware (serve_app/api/failover.py)."""
    from serve_app.api import failover

    setting = f"{failover.ENV_VAR}={failover.IMPORT_PATH}"
    assert setting in (REPO / "Dockerfile").read_text()
    assert setting in (REPO / "Makefile").read_text()
    readme = (REPO / "README.md").read_text()
    production = readme[readme.index("## Serving for real"):]
    assert production.count(setting) >= 1
