"""Session-wide fixtures: a real Ray cluster on 127.0.0.1 with the Serve app deployed on
tiny generated checkpoints, and real audio files in several formats."""

from __future__ import annotations

import os

# Before Ray is imported: keep every Ray listener on loopback; no usage stats; no token
# auth for the test cluster (production keeps Ray's default token auth).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serve_app.cluster import LocalServe, load_app, local_serve
from tests import clips as clip_maker

REPO = Path(__file__).resolve().parents[1]
APP_NAME = "emotion2vec"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
# The published emotion2vec_plus_large's config.yaml, tokens.txt and configuration.json
PUBLISHED = REPO / "tests" / "data" / "emotion2vec_plus_large"


@pytest.fixture(scope="session")
def cluster():
    with local_serve(num_cpus=2) as serve_handle:
        yield serve_handle


@dataclass
class Service:
    url: str
    app: dict
    checkpoints: dict[str, Path]   # variant -> checkpoint directory
    results_dir: Path
    cluster: LocalServe


@pytest.fixture(scope="session")
def service(cluster, tmp_path_factory) -> Service:
    """The tiny test config, deployed as a config file is (checkpoints generated on start)."""
    checkpoint_root = tmp_path_factory.mktemp("checkpoints")
    results_dir = tmp_path_factory.mktemp("results")
    app = load_app(TINY_CONFIG, checkpoint_root, output_dir=str(results_dir))
    cluster.put(app)
    status = cluster.wait_for(APP_NAME, ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY"))
    assert status.status == "RUNNING", status
    checkpoints = {d["name"]: Path(d["user_config"]["source"])
                   for d in app["deployments"] if "source" in d["user_config"]}
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
