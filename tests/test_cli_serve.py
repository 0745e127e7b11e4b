"""The app run the way users run it, with Ray's own commands from this environment: `serve run`
on a config file (serve run starts Ray itself), and `serve deploy` to a Ray head started with
`ray start --head --block`, deployed again with another checkpoint for one variant while
requests keep coming. Each on a copy of configs/tiny.yaml with free ports, tiny checkpoints
generated into a temporary folder, and a Ray temp dir of its own (so that neither command
finds any other Ray on the machine). Neither uses the session's cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from serve_app.tools.cluster import free_port, load_app
from tests.conftest import TINY_CONFIG
from tests.processes import Session
from tests.test_lifecycle import tiny
from tests.traffic import Traffic, post_clip
from tests.waiting import eventually

pytestmark = pytest.mark.cluster  # starts its own Ray (`ray start`, `serve run`)
BIN = Path(sys.executable).parent  # the environment's `serve` and `ray`
START_S = 240  # a fresh Ray and four replicas on a busy 2-core machine


@pytest.fixture
def ray_temp() -> Iterator[str]:
    """A short temp dir (Unix socket paths stay under 107 bytes), removed afterwards."""
    path = tempfile.mkdtemp(prefix="e2v", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def command_env(**extra: str) -> dict[str, str]:
    """This process's environment (loopback, no usage stats, no token auth: tests/conftest.py)
    without any RAY_ADDRESS, so that a command never joins a cluster it was not given."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def write_config(folder: Path, port: int, **variant_configs: dict) -> Path:
    """configs/tiny.yaml with this HTTP port and its checkpoints under folder (generated on
    load); variant_configs: variant -> user_config updates."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["http_options"]["port"] = port
    app = load_app(TINY_CONFIG, folder / "checkpoints")
    for deployment in app["deployments"]:
        deployment["user_config"].update(variant_configs.get(deployment["name"], {}))
    config["applications"] = [app]
    path = folder / "tiny-copy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_until(ready, what: str, session: Session, timeout_s: float = START_S) -> None:
    """Poll ready() until it is true; fail at once, with the log's end, if the command ends."""
    def check() -> bool:
        if ready():
            return True
        assert not session.exited(), f"{session.command[:2]} ended:\n{session.tail()}"
        return False

    eventually(check, lambda: f"{what} (the log's end:\n{session.tail()}\n)", timeout_s,
               interval_s=0.5, retry_on=())


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.TransportError:
        return False


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def predict(url: str, clip: Path, **fields) -> dict:
    response = httpx.post(url + "/v1/predict", files={"file": (clip.name, clip.read_bytes())},
                          data=fields, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert sum(body["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    return body


class Phases:
    """Seconds each phase took, printed (pytest -rP shows them): where these tests' time goes."""

    def __init__(self) -> None:
        self.last, self.took = time.monotonic(), {}

    def done(self, phase: str) -> None:
        now = time.monotonic()
        self.took[phase], self.last = round(now - self.last, 1), now
        print(f"{phase}: {self.took[phase]} s")


def test_serve_run_serves_the_config_and_stops_on_ctrl_c(tmp_path, ray_temp, clips):
    port = free_port()
    config = write_config(tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    phases = Phases()
    with Session([str(BIN / "serve"), "run", str(config)], tmp_path / "serve-run.log",
                 command_env(RAY_TMPDIR=ray_temp)) as run:
        wait_until(lambda: answers(url + "/ready"), "/ready answering", run)
        phases.done("serve run until /ready")
        body = predict(url, clips["tone_16k_mono_wav"])
        assert (body["model_version"], body["model"]["source"]) == ("large", "tiny-seed2")
        code = run.stop(signal.SIGINT, timeout_s=60)  # Ctrl-C
        phases.done(f"predict, Ctrl-C and stop ({len(run.killed)} processes left to kill)")
    assert code == 0, run.tail()
    assert port_closed(port), "something still serves the app's port"


def test_serve_deploy_swaps_a_variant_without_a_failed_request(tmp_path, ray_temp, clips):
    http_port, dashboard_port = free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    url = f"http://127.0.0.1:{http_port}"
    head_command = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(free_port()), "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port), "--temp-dir", ray_temp, "--num-cpus", "2",
        # Ports that default to fixed numbers another Ray on the machine may hold.
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--object-store-memory", str(200 * 2**20), "--disable-usage-stats"]

    def deploy(config: Path) -> None:
        done = subprocess.run([str(BIN / "serve"), "deploy", "-a", dashboard, str(config)],
                              capture_output=True, text=True, timeout=120, env=command_env())
        assert done.returncode == 0, done.stdout + done.stderr

    # On SIGTERM the head drains first (30 s by default): nothing here to drain to.
    head_env = command_env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    phases = Phases()
    with Session(head_command, tmp_path / "ray-start.log", head_env) as head:
        wait_until(lambda: answers(dashboard + "/api/serve/applications/"),
                   "the dashboard answering", head)
        phases.done("ray start until the dashboard answers")
        config = write_config(tmp_path, http_port)
        deploy(config)
        wait_until(lambda: answers(url + "/ready"), "/ready answering", head)
        phases.done("serve deploy until /ready")
        clip = clips["tone_16k_mono_wav"]
        old_scores = predict(url, clip, model_version="base")["scores"]
        before = httpx.get(url + "/v1/models", timeout=30).json()["variants"]["base"]

        with Traffic(url, post_clip(clip, model_version="base"), senders=2) as traffic:
            traffic.wait_for(2)
            # The same file, edited: another checkpoint for base, everything else as it was.
            write_config(tmp_path, http_port, base=tiny(tmp_path / "checkpoints", 31))
            deploy(config)

            def swapped() -> bool:
                info = httpx.get(url + "/v1/models", timeout=30).json()["variants"]["base"]
                return (info["identity"] or {}).get("sha256") not in (
                    None, before["identity"]["sha256"])

            wait_until(swapped, "base swapped", head, timeout_s=120)
            swapped_at = time.monotonic()
            phases.done("serve deploy again until base is swapped, under load")
            traffic.wait_for(2, since=swapped_at)
        assert traffic.outcomes and not traffic.failures(), [str(f) for f in traffic.failures()]
        after = httpx.get(url + "/v1/models", timeout=30).json()["variants"]
        assert after["base"]["source"] == "tiny-seed31"
        assert after["base"]["last_swap"]["result"] == "ok"
        # Swapped in place; large was not touched.
        assert (after["base"]["pid"], after["base"]["load_count"]) == (
            before["pid"], before["load_count"] + 1)
        assert after["large"]["load_count"] == 1
        assert predict(url, clip, model_version="base")["scores"] != old_scores
        code = head.stop(signal.SIGTERM, timeout_s=60)
        phases.done(f"checks, SIGTERM and stop ({len(head.killed)} processes left to kill)")
    assert code is not None, head.tail()  # it ended on SIGTERM, not on the SIGKILL after
    assert port_closed(http_port) and port_closed(dashboard_port)
