"""Session-wide fixtures: a real Ray cluster on 127.0.0.1 with the Serve app deployed on
tiny generated checkpoints, and real audio files in several formats."""

from __future__ import annotations

import os

# Before Ray is imported: keep every Ray listener on loopback; no usage stats; no token
# auth for the test cluster (production keeps Ray's default token auth).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"

import copy
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests import clips as clip_maker

REPO = Path(__file__).resolve().parents[1]
APP_NAME = "emotion2vec"
DEPLOY_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_config(path: Path, checkpoint_root: Path | None = None, **router_overrides) -> dict:
    """The application entry of a config file; checkpoint sources moved under checkpoint_root."""
    config = yaml.safe_load(path.read_text())
    (app,) = config["applications"]
    app = copy.deepcopy(app)
    for deployment in app.get("deployments", []):
        user_config = deployment.get("user_config") or {}
        if checkpoint_root is not None and "source" in user_config:
            user_config["source"] = str(checkpoint_root / Path(user_config["source"]).name)
        if deployment["name"] == "Router":
            user_config.update(router_overrides)
    return app


@dataclass
class Cluster:
    url: str
    deployed: list[dict] = field(default_factory=list)

    def deploy(self, *apps: dict) -> None:
        """Apply a whole Serve config (declarative, the path `serve deploy` takes)."""
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate({"applications": list(apps)})
        _get_global_client().deploy_apps(schema)
        self.deployed = list(apps)

    def wait_for(self, name: str, statuses: tuple[str, ...], timeout_s: float = DEPLOY_TIMEOUT_S):
        from ray import serve

        deadline = time.monotonic() + timeout_s
        status = None
        while time.monotonic() < deadline:
            status = serve.status().applications.get(name)
            if status is not None and status.status in statuses:
                return status
            time.sleep(0.5)
        raise TimeoutError(f"application {name} not in {statuses} after {timeout_s} s: {status}")


@pytest.fixture(scope="session")
def cluster():
    import ray
    from ray import serve

    # Unix socket paths must stay short: a temp dir directly under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="e2v", dir="/tmp")
    ray.init(num_cpus=2, _temp_dir=temp_dir, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield Cluster(url=f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class Service:
    url: str
    app: dict
    checkpoints: dict[str, Path]   # variant -> checkpoint directory
    results_dir: Path
    cluster: Cluster


@pytest.fixture(scope="session")
def service(cluster, tmp_path_factory) -> Service:
    """The tiny test config, deployed as a config file is (checkpoints generated on start)."""
    checkpoint_root = tmp_path_factory.mktemp("checkpoints")
    results_dir = tmp_path_factory.mktemp("results")
    app = app_config(REPO / "configs" / "tiny.yaml", checkpoint_root,
                     output_dir=str(results_dir))
    cluster.deploy(app)
    status = cluster.wait_for(APP_NAME, ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY"))
    assert status.status == "RUNNING", status
    checkpoints = {d["name"]: Path(d["user_config"]["source"])
                   for d in app["deployments"] if "source" in d.get("user_config", {})}
    return Service(cluster.url, app, checkpoints, results_dir, cluster)


@pytest.fixture(scope="session")
def client(service):
    with httpx.Client(base_url=service.url, timeout=60.0) as http:
        yield http


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    return clip_maker.make_all(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="session")
def funasr_models():
    """FunASR's own AutoModel per checkpoint directory, loaded once, in this process."""
    from funasr import AutoModel

    loaded: dict[Path, object] = {}

    def get(directory: Path):
        if directory not in loaded:
            loaded[directory] = AutoModel(model=str(directory), device="cpu", ncpu=1,
                                          disable_update=True, disable_pbar=True)
        return loaded[directory]

    return get
