"""Configs that ask for GPUs the cluster lacks fail at deploy time, naming the fix."""

from __future__ import annotations

import pytest

from serve_app.app import ResourceError, check_resources
from serve_app.config import AppArgs
from serve_app.cluster import load_app
from tests.conftest import REPO


@pytest.mark.parametrize("config", ["deploy.yaml", "configs/single-gpu.yaml"])
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
    check_resources(args, {"CPU": 8, "GPU": 2})
    with pytest.raises(ResourceError, match=r"2 GPUs .* cluster has 1\b.*single-gpu.yaml"):
        check_resources(args, {"CPU": 8, "GPU": 1})
    with pytest.raises(ResourceError, match=r"2.25 CPUs but the cluster has 2\b.*threads"):
        check_resources(args, {"CPU": 2, "GPU": 2})


def test_every_shipped_config_is_valid():
    from serve_app.config import ModelSettings, RouterSettings

    import yaml
    from ray.serve.schema import ServeDeploySchema

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
