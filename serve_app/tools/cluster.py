"""Start a local Ray cluster with Serve on loopback (one node, or several nodes on 127.0.0.1)
and apply configs to it, the way `serve run` / `serve deploy` do (the declarative path, so
user_config changes reconfigure replicas in place). Used by the tests and the benchmarks."""

from __future__ import annotations

import copy
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from serve_app.api import failover

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# The proxy replays requests lost with a Router replica (serve_app/api/failover.py).
PROXY_ENV = {failover.ENV_VAR: failover.IMPORT_PATH}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_app(path: str | os.PathLike, checkpoint_root: Path | None = None,
             **router_overrides) -> dict:
    """The single application of a config file; with checkpoint_root, local checkpoint
    sources are moved under it; router_overrides update the Router's user_config."""
    config = yaml.safe_load(Path(path).read_text())
    (app,) = config["applications"]
    app = copy.deepcopy(app)
    for deployment in app.get("deployments", []):
        user_config = deployment.setdefault("user_config", {})
        if checkpoint_root is not None and user_config.get("generate"):
            user_config["source"] = str(Path(checkpoint_root) / Path(user_config["source"]).name)
        if deployment["name"] == "Router":
            user_config.update(router_overrides)
    return app


class LocalServe:
    """Handle on a Serve instance started by `local_serve` or `local_cluster`, with the apps
    applied to it."""

    def __init__(self, url: str, metrics_url: str, temp_dir: str, nodes=None):
        self.url = url
        self.metrics_url = metrics_url  # the head node's Prometheus endpoint
        self.temp_dir = temp_dir        # Ray's logs are under session_latest/logs
        self.nodes = nodes              # local_cluster: its ray.cluster_utils.Cluster
        self.apps: dict[str, dict] = {}

    def put(self, *apps: dict) -> None:
        """Create or update these apps (by name), keeping the others as they are."""
        self.apps.update({app["name"]: app for app in apps})
        self._apply()

    def remove(self, *names: str) -> None:
        for name in names:
            self.apps.pop(name, None)
        self._apply()

    def _apply(self) -> None:
        deploy_config({"applications": list(self.apps.values())})

    def wait_for(self, name: str, statuses: tuple[str, ...], timeout_s: float = 300):
        from ray import serve

        deadline = time.monotonic() + timeout_s
        status = None
        while time.monotonic() < deadline:
            status = serve.status().applications.get(name)
            if status is not None and status.status in statuses:
                return status
            time.sleep(0.25)
        raise TimeoutError(f"application {name} not in {statuses} after {timeout_s} s: {status}")


def loopback_env() -> None:
    """Keep the Ray that this process starts on 127.0.0.1 (unless the environment says
    otherwise): before Ray is imported. The nodes' processes (the proxy too) inherit it."""
    for key, value in {**LOOPBACK_ENV, **PROXY_ENV}.items():
        os.environ.setdefault(key, value)


@contextmanager
def _serve_on_head(temp_dir: str, metrics_port: int, nodes=None) -> Iterator[LocalServe]:
    """Serve on the cluster this process joined, its proxy on the head node at 127.0.0.1;
    on exit Serve stops and this process leaves the cluster."""
    import ray
    from ray import serve

    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        yield LocalServe(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics",
                         temp_dir, nodes)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@contextmanager
def _agent_port(port: int) -> Iterator[None]:
    """Ray's node agent (which runs the job server's jobs) listens on 52365 unless told
    otherwise, and ray.init cannot tell it: a second cluster on the machine would then have no
    job server. Its RayParams get `port` while ray.init starts the node."""
    from ray._private import parameter

    original = parameter.RayParams.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", port)
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = init
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original


@contextmanager
def local_serve(num_cpus: int | None = None, dashboard: bool = False) -> Iterator[LocalServe]:
    """A Ray cluster of this process's own (stopped on exit) with Serve on 127.0.0.1."""
    loopback_env()
    import ray

    # Unix socket paths must stay under 107 bytes: a short temp dir directly under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="e2v", dir="/tmp")
    metrics_port = free_port()
    # The dashboard (with Ray's job server, for jobs over HTTP) and the node's agent on ports
    # of their own: several clusters of this machine never take each other's.
    with _agent_port(free_port()):
        ray.init(num_cpus=num_cpus, _temp_dir=temp_dir, include_dashboard=dashboard,
                 dashboard_host="127.0.0.1", dashboard_port=free_port() if dashboard else None,
                 log_to_driver=False, _metrics_export_port=metrics_port,
                 _node_ip_address="127.0.0.1")
    # Ray's job server gives each job's driver the address recorded in the node's temp dir;
    # ray.init records none, and Ray then picks any cluster running on the machine.
    ray._private.utils.write_ray_address(ray.get_runtime_context().gcs_address, temp_dir)
    try:
        with _serve_on_head(temp_dir, metrics_port) as handle:
            yield handle
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def local_cluster(head: dict, workers: list[dict],
                  system_config: dict | None = None) -> Iterator[LocalServe]:
    """Several Ray nodes on 127.0.0.1 (Ray's own multi-node helper, ray.cluster_utils.Cluster),
    joined by this process, with Serve on them; `head` and each of `workers` are node
    arguments (num_cpus, resources, ...). The proxy runs on the head only: every node has the
    same address, so the HTTP port can hold one proxy. `.nodes` adds and removes nodes."""
    loopback_env()
    import ray
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="e2v", dir="/tmp")
    # Ray's default temp dir (sessions, and the address file that `ray.init("auto")` reads)
    # follows RAY_TMPDIR: keep them in this cluster's own folder, not the machine's /tmp/ray.
    previous_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    metrics_port = free_port()
    common = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    nodes = Cluster()
    try:
        nodes.add_node(**common, **head, metrics_export_port=metrics_port,
                       _system_config=system_config or {})
        for worker in workers:
            nodes.add_node(**common, **worker)
        ray.init(address=nodes.address, log_to_driver=False)
        with _serve_on_head(temp_dir, metrics_port, nodes) as handle:
            yield handle
    finally:
        try:
            nodes.shutdown()
        finally:
            if previous_tmpdir is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = previous_tmpdir
            shutil.rmtree(temp_dir, ignore_errors=True)


def deploy_config(config: dict) -> None:
    """Apply a Serve config (a config file's content) to the cluster this process joined with
    `ray.init(address=...)`, as `serve deploy` does without going through the dashboard:
    applications it does not list are deleted; its http_options are not applied (they are
    fixed when Serve starts)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate({"applications": config["applications"]})
    _get_global_client().deploy_apps(schema)
