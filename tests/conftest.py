"""Session-wide fixtures: a real Ray cluster on 127.0.0.1 with the Serve app deployed on
tiny generated checkpoints, and real audio files in several formats."""

from __future__ import annotations

import os

# Before Ray is imported: keep every Ray listener on loopback; no usage stats; no token
# auth for the test cluster (production keeps Ray's default token auth).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
# Custom metrics reach the Prometheus endpoint every 2 s instead of every 10 s: the tests that
# read them wait less (Ray never reports more often than once a second).
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")

import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from serve_app.tools.cluster import LocalServe, load_app, local_serve
from tests import clips as clip_maker

REPO = Path(__file__).resolve().parents[1]
APP_NAME = "emotion2vec"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
# The published emotion2vec_plus_large's config.yaml, tokens.txt and configuration.json
PUBLISHED = REPO / "tests" / "data" / "emotion2vec_plus_large"
# Deployment options that only cost time in tests: a replica whose model breaks, or that dies,
# is noticed after a 2 s health check period instead of Serve's 10 s.
TEST_DEPLOYMENT_OPTIONS = {"health_check_period_s": 2}

# Property-based tests run the same examples every time (derandomized, no example database)
# and no deadline flakes on a busy machine; HYPOTHESIS_PROFILE=explore looks further, at random.
hypothesis_settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=100,
    suppress_health_check=[HealthCheck.too_slow], print_blob=True)
hypothesis_settings.register_profile(
    "explore", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def tiny_app(checkpoint_root: Path | None = None, **router_overrides) -> dict:
    """The tiny test config's application (see load_app), with TEST_DEPLOYMENT_OPTIONS."""
    app = load_app(TINY_CONFIG, checkpoint_root, **router_overrides)
    for deployment in app["deployments"]:
        deployment.update(TEST_DEPLOYMENT_OPTIONS)
    return app


def pytest_collection_modifyitems(items):
    """Mark every test that needs the session's cluster: `make test-fast` leaves them out."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def cluster():
    # With the dashboard: its job server runs the jobs of POST /v1/jobs.
    with local_serve(num_cpus=2, dashboard=True) as serve_handle:
        yield serve_handle


@pytest.fixture(scope="session")
def address(cluster) -> str:
    """The session cluster's GCS address, for a job that joins it (`batch --address`)."""
    import ray

    return ray.get_runtime_context().gcs_address


@dataclass
class Service:
    url: str
    app: dict
    checkpoints: dict[str, Path]   # variant -> checkpoint directory
    results_dir: Path
    cluster: LocalServe
    heads_dir: Path
    jobs_dir: Path


CALLBACK_SECRET = "a-test-secret-for-job-callbacks"


def jobs_settings(tmp_path_factory) -> dict:
    """The Router's jobs settings in the tests: jobs read the tests' own folders, call back
    127.0.0.1 only, retry fast, and run their engines on a quarter CPU."""
    return {"allow_inputs": [str(tmp_path_factory.getbasetemp())],
            "callback_hosts": ["127.0.0.1"], "callback_secret": CALLBACK_SECRET,
            "callback_attempts": 3, "callback_timeout_s": 1.0, "callback_backoff_s": 0.2,
            "engine_num_cpus": 0.25, "decode_num_cpus": 0.25, "files_per_task": 4,
            "part_s": 0.5, "max_jobs_per_key": 3}


@pytest.fixture(scope="session")
def service(cluster, tmp_path_factory) -> Service:
    """The tiny test config, deployed as a config file is (checkpoints generated on start)."""
    checkpoint_root = tmp_path_factory.mktemp("checkpoints")
    results_dir = tmp_path_factory.mktemp("results")
    heads_dir = tmp_path_factory.mktemp("heads")
    jobs_dir = tmp_path_factory.mktemp("jobs")
    app = tiny_app(checkpoint_root, output_dir=str(results_dir), heads_dir=str(heads_dir),
                   jobs_dir=str(jobs_dir), jobs=jobs_settings(tmp_path_factory))
    cluster.put(app)
    status = cluster.wait_for(APP_NAME, ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY"))
    assert status.status == "RUNNING", status
    checkpoints = {d["name"]: Path(d["user_config"]["source"])
                   for d in app["deployments"] if "source" in d["user_config"]}
    return Service(cluster.url, app, checkpoints, results_dir, cluster, heads_dir, jobs_dir)



@pytest.fixture(scope="session")
def service_config(service, tmp_path_factory) -> Path:
    """The service's own app as a Serve config file: tools that load its variants (`batch`,
    `heads train`, `heads evaluate --local`) load the checkpoints it serves, and its heads_dir."""
    path = tmp_path_factory.mktemp("service-config") / "config.yaml"
    path.write_text(yaml.safe_dump({"applications": [service.app]}))
    return path

@dataclass
class KeyedService:
    url: str
    app: dict
    keys: dict[str, str]    # key id -> the key
    cluster: LocalServe


KEYED_APP, KEYED_PREFIX = "keys", "/keys"


@pytest.fixture(scope="session")
def keyed(cluster, service, tmp_path_factory) -> KeyedService:
    """The tiny config's base variant as a second app with API keys on, beside the open main
    app: alpha (no limits), beta and meter (requests), gamma and streamer (audio seconds),
    rotate, protocols (requests, spent on /v2), jobber (audio seconds, spent by a job), and cli
    and web from a key file: each test that spends a quota or changes a key has a key of its
    own. Quotas in a 6 s window, so that tests wait seconds."""
    from serve_app.tools.cli import new_key

    keys, lines = {}, {}
    for key_id, rpm, audio_spm in [("alpha", None, None), ("beta", 20, None),
                                   ("meter", 20, None),
                                   ("gamma", None, 30), ("rotate", None, None),
                                   ("cli", None, None), ("web", None, None),
                                   ("streamer", None, 30), ("protocols", 10, None),
                                   ("jobber", None, 60)]:
        keys[key_id], line = new_key(key_id, rpm, audio_spm)
        lines.update(yaml.safe_load(line))
    key_file = tmp_path_factory.mktemp("keys") / "api-keys.json"
    key_file.write_text(json.dumps({k: lines.pop(k) for k in ("cli", "web")}))
    app = tiny_app(service.checkpoints["base"].parent)
    app.update(name=KEYED_APP, route_prefix=KEYED_PREFIX)
    app["args"]["variants"] = {"base": {"num_cpus": 0.05}}
    app["args"]["vad_num_cpus"] = None  # no VAD deployment: nothing here segments
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("Router", "base")]
    router = next(d for d in app["deployments"] if d["name"] == "Router")
    router["user_config"] = {"default_version": "base", "api_keys": lines,
                             "api_keys_file": str(key_file), "quota_window_s": 6,
                             "jobs_dir": str(tmp_path_factory.mktemp("keyed-jobs")),
                             "jobs": jobs_settings(tmp_path_factory)}
    cluster.put(app)
    status = cluster.wait_for(KEYED_APP, ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY"))
    assert status.status == "RUNNING", status
    return KeyedService(cluster.url + KEYED_PREFIX, app, keys, cluster)


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
