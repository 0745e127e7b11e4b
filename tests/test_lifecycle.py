"""Hot swap and model lifecycle through the declarative deploy path, on a real cluster:
model availability during a reload, update while inferencing, live router mapping, idle
release and scale to zero. (A failed reload keeps the old model: test_checkpoint_formats.)"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile

from serve_app.audio import sndfile
from tests.conftest import tiny_app
from tests.traffic import Traffic, post_clip
from tests.waiting import eventually

APP = "lifecycle"
PREFIX = "/lc"


def make_app(checkpoint_root: Path, name: str = APP, prefix: str = PREFIX,
             variants: tuple[str, ...] = ("base", "large"), router: dict | None = None,
             **model_overrides) -> dict:
    """The tiny config as another app, with no VAD deployment (none of its users segments:
    a replica fewer to start); model_overrides: variant -> user_config updates."""
    app = tiny_app(checkpoint_root)
    app.update(name=name, route_prefix=prefix)
    app["args"]["vad_num_cpus"] = None
    app["args"]["variants"] = {v: app["args"]["variants"][v] for v in variants}
    app["deployments"] = [d for d in app["deployments"] if d["name"] in (*variants, "Router")]
    for deployment in app["deployments"]:
        if deployment["name"] == "Router":
            deployment["user_config"] = router or {"default_version": variants[0]}
        elif deployment["name"] in model_overrides:
            deployment["user_config"] = {**deployment["user_config"],
                                         **model_overrides[deployment["name"]]}
    return app


def tiny(root: Path, seed: int) -> dict:
    return {"source": str(root / f"tiny-seed{seed}"), "generate": {"arch": "tiny", "seed": seed}}


class Client:
    def __init__(self, url: str, prefix: str):
        self.url = url + prefix
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def predict(self, clip: Path, **fields) -> httpx.Response:
        return self.http.post("/v1/predict", files={"file": (clip.name, clip.read_bytes())},
                              data=fields)

    def variant(self, name: str) -> dict:
        return self.http.get("/v1/models").json()["variants"][name]

    def wait(self, name: str, condition, timeout_s: float = 90) -> dict:
        """The variant's /v1/models entry, once condition(entry) holds."""
        def met() -> dict:
            info = self.variant(name)
            assert condition(info), info
            return info

        return eventually(met, f"{name} meeting the condition", timeout_s)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lifecycle-checkpoints")


def initial_app(root: Path) -> dict:
    return make_app(root, base=tiny(root, 11), large=tiny(root, 12))


@pytest.fixture(scope="module")
def lifecycle_app(cluster, root):
    cluster.put(initial_app(root))
    assert cluster.wait_for(APP, ("RUNNING", "DEPLOY_FAILED")).status == "RUNNING"
    yield Client(cluster.url, PREFIX)
    cluster.remove(APP)


@pytest.fixture
def lifecycle(cluster, root, lifecycle_app):
    """The module's app as initial_app deploys it, whatever the test changes: a test that
    changed it gets it back (base seed 11, large seed 12, the router's default base)."""
    yield lifecycle_app
    initial = initial_app(root)
    if cluster.apps[APP] == initial:
        return
    cluster.put(initial)
    for name in ("base", "large"):
        lifecycle_app.wait(name, lambda i, n=name: i["state"] == "ready" and (
            i["identity"] or {}).get("source") == f"tiny-seed{11 if n == 'base' else 12}")

    def restored() -> bool:
        models = lifecycle_app.http.get("/v1/models").json()
        assert not models["aliases"] and models["default_version"] == "base", models
        return True

    eventually(restored, "the router restored (no aliases, default base)", 60)


def expected_scores(funasr_models, directory: Path, clip: Path) -> list[float]:
    decoded = sndfile.decode(clip.read_bytes(), max_duration_s=60, min_duration_s=0.1)
    return funasr_models(directory).generate(decoded.waveform)[0]["scores"]


def ordered(body: dict) -> list[float]:
    return list(body["scores"].values())


def test_swap_under_load_fails_no_request(cluster, root, lifecycle, clips, funasr_models):
    clip = clips["tone_16k_mono_wav"]
    before = lifecycle.variant("base")
    old_scores = expected_scores(funasr_models, root / "tiny-seed11", clip)
    # The pod's readiness probe, polled all along: a swap never takes the pod out.
    probe = Traffic(cluster.url + PREFIX, lambda http, _s, _n: http.get("/ready"), senders=1,
                    read=lambda response: response.json()["variants"]["base"])
    with probe, Traffic(cluster.url + PREFIX, post_clip(clip, model_version="base"),
                        senders=3, read=lambda response: ordered(response.json())) as traffic:
        traffic.wait_for(3)
        cluster.put(make_app(root, base=tiny(root, 21), large=tiny(root, 12)))
        swapped = lifecycle.wait(
            "base", lambda i: (i["last_swap"] or {}).get("result") == "ok")
        swap_seen_at = time.monotonic()
        traffic.wait_for(3, since=swap_seen_at)
    assert not traffic.failures(), [str(f) for f in traffic.failures()[:3]]
    # Never 503; whether a probe fell inside the swap (a tiny model loads in a second) is
    # chance: the rule itself is tests/test_readiness.py's, and idle release's below.
    assert not probe.failures(), [str(f) for f in probe.failures()[:3]]
    assert swapped["pid"] == before["pid"]  # swapped inside the same replica process
    assert swapped["load_count"] == before["load_count"] + 1
    assert swapped["identity"]["sha256"] != before["identity"]["sha256"]
    assert swapped["last_swap"]["from"]["sha256"] == before["identity"]["sha256"]
    new_scores = expected_scores(funasr_models, root / "tiny-seed21", clip)
    assert not np.allclose(old_scores, new_scores, atol=1e-3)
    # Every answer came from one model or the other, the old first, the new at the end.
    results = sorted(traffic.outcomes, key=lambda outcome: outcome.ended)
    for outcome in results:
        assert (np.allclose(outcome.value, old_scores, atol=1e-5) or
                np.allclose(outcome.value, new_scores, atol=1e-5))
    np.testing.assert_allclose(results[0].value, old_scores, atol=1e-5)
    np.testing.assert_allclose(results[-1].value, new_scores, atol=1e-5)
    assert sum(1 for outcome in results if outcome.started < swap_seen_at) >= 3
    np.testing.assert_allclose(ordered(lifecycle.predict(clip, model_version="base").json()),
                               new_scores, atol=1e-5)


def test_reconfigure_with_the_same_config_loads_once(cluster, root, lifecycle):
    from ray import serve

    before = lifecycle.variant("base")
    app = copy.deepcopy(cluster.apps[APP])
    cluster.put(app)  # the same config again through the deploy path
    user_config = next(d for d in app["deployments"] if d["name"] == "base")["user_config"]
    handle = serve.get_deployment_handle("base", app_name=APP)
    handle.reconfigure.remote(user_config).result(timeout_s=60)
    handle.reconfigure.remote(copy.deepcopy(user_config)).result(timeout_s=60)
    time.sleep(1.0)
    after = lifecycle.variant("base")
    assert after["load_count"] == before["load_count"]
    assert after["loaded_at"] == before["loaded_at"]


def test_default_and_aliases_change_live(cluster, root, lifecycle, clips):
    clip = clips["tone_16k_mono_wav"]
    before = {name: lifecycle.variant(name) for name in ("base", "large")}
    router = {"default_version": "large", "aliases": {"newest": "base", "stable": "large"}}
    app = cluster.apps[APP]  # the variants as they are: only the router changes
    cluster.put({**app, "deployments": [
        {**d, "user_config": router} if d["name"] == "Router" else d
        for d in app["deployments"]]})
    eventually(lambda: lifecycle.http.get("/v1/models").json()["aliases"] == router["aliases"],
               "the router taking the new aliases", 60)
    assert lifecycle.http.get("/v1/models").json()["default_version"] == "large"
    assert lifecycle.predict(clip).json()["model_version"] == "large"
    assert lifecycle.predict(clip, model_version="newest").json()["model_version"] == "base"
    assert lifecycle.predict(clip, model_version="stable").json()["model_version"] == "large"
    # Nothing restarted or reloaded for a router change.
    for name, info in before.items():
        now = lifecycle.variant(name)
        assert (now["pid"], now["load_count"]) == (info["pid"], info["load_count"])


def test_restarting_change_has_no_stall(cluster, root, clips):
    """A change that restarts replicas (resources in args): with max_surge_percent the new
    replicas are up before the old ones go, and in-flight requests finish."""
    app = make_app(root, name="restart", prefix="/restart", variants=("base",),
                   base=tiny(root, 11))
    cluster.put(app)
    try:
        assert cluster.wait_for("restart", ("RUNNING", "DEPLOY_FAILED")).status == "RUNNING"
        client = Client(cluster.url, "/restart")
        before = client.variant("base")
        with Traffic(cluster.url + "/restart", post_clip(clips["tone_16k_mono_wav"]),
                     senders=2) as traffic:
            traffic.wait_for(2)
            restarted = copy.deepcopy(app)
            restarted["args"]["variants"]["base"]["num_cpus"] = 0.15
            cluster.put(restarted)
            client.wait("base", lambda i: i.get("pid") not in (None, before["pid"]))
            assert cluster.wait_for("restart", ("RUNNING",)).status == "RUNNING"
            traffic.wait_for(2, since=time.monotonic())  # answered by the new replica
        assert traffic.outcomes and not traffic.failures(), traffic.counts()
    finally:
        cluster.remove("restart")


def long_clip(folder: Path, seconds: float) -> Path:
    path = folder / f"long-{seconds:g}s.wav"
    t = np.arange(int(seconds * 16_000)) / 16_000
    soundfile.write(path, (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16_000)
    return path


def test_idle_unload_releases_memory_and_reloads(cluster, root, clips, tmp_path):
    """A base-sized model (94 M parameters) so that the memory it frees is measurable."""
    idle_s = 4.0
    app = make_app(root, name="idle", prefix="/idle", variants=("base",),
                   base={"source": str(root / "base-seed0"),
                         "generate": {"arch": "base", "seed": 0}, "threads": 2,
                         "idle_unload_s": idle_s})
    cluster.put(app)
    try:
        assert cluster.wait_for("idle", ("RUNNING", "DEPLOY_FAILED")).status == "RUNNING"
        client = Client(cluster.url, "/idle")
        short, long = clips["tone_16k_mono_wav"], long_clip(tmp_path, 25.0)
        assert client.predict(short).status_code == 200
        last_use = time.monotonic()
        loaded = client.variant("base")
        assert loaded["state"] == "ready" and loaded["load_count"] == 1
        # A request that is running when the idle deadline passes is not cut short.
        time.sleep(max(0.0, idle_s - 0.5 - (time.monotonic() - last_use)))
        started = time.monotonic()
        running = client.predict(long)
        assert running.status_code == 200
        assert time.monotonic() - started > 0.5 + 0.2, "the long request ended too soon"
        assert client.variant("base")["load_count"] == 1
        unloaded = client.wait("base", lambda i: i["state"] == "unloaded", timeout_s=60)
        assert unloaded["identity"] is None
        assert unloaded["rss_bytes"] < loaded["rss_bytes"] - 200 * 2**20, (
            loaded["rss_bytes"], unloaded["rss_bytes"])
        # Released, it can still serve (the next request loads it): the pod stays ready.
        ready = client.http.get("/ready")
        assert (ready.status_code, ready.json()["variants"]) == (200, {"base": "unloaded"})
        # The next request loads the model again, waits for it, and succeeds.
        again = client.predict(short)
        assert again.status_code == 200
        assert ordered(again.json()) == pytest.approx(
            ordered(client.predict(short).json()), abs=1e-6)
        reloaded = client.variant("base")
        assert reloaded["state"] == "ready" and reloaded["load_count"] == 2
        assert reloaded["pid"] == loaded["pid"]
    finally:
        cluster.remove("idle")


def test_autoscaling_to_zero_frees_everything_and_scales_back(cluster, root, clips):
    from ray import serve

    app = make_app(root, name="scale0", prefix="/scale0", variants=("base",),
                   base=tiny(root, 11))
    for deployment in app["deployments"]:
        if deployment["name"] == "base":
            deployment["autoscaling_config"] = {
                "min_replicas": 0, "initial_replicas": 1, "max_replicas": 1,
                "target_ongoing_requests": 1, "upscale_delay_s": 0, "downscale_delay_s": 2,
                "downscale_to_zero_delay_s": 2}

    def running_replicas() -> int:
        status = serve.status().applications["scale0"].deployments["base"]
        return status.replica_states.get("RUNNING", 0)

    cluster.put(app)
    try:
        assert cluster.wait_for("scale0", ("RUNNING", "DEPLOY_FAILED")).status == "RUNNING"
        eventually(lambda: running_replicas() == 0, "scaled to zero", 90, interval_s=0.5)
        client = Client(cluster.url, "/scale0")
        assert client.variant("base")["state"] == "scaled_to_zero"  # and asking started none
        assert running_replicas() == 0
        response = client.predict(clips["tone_16k_mono_wav"])  # waits for a new replica
        assert response.status_code == 200, response.text
        assert running_replicas() == 1
    finally:
        cluster.remove("scale0")
