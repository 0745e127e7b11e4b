"""Rollouts on the real service: a weighted canary between large and a "fine-tuned" large_ft
(another generated checkpoint), sticky sessions, a 0 -> 10 -> 50 -> 100 % ramp by redeploys
under load, and shadow comparison, through the declarative deploy path on an app of its own."""

from __future__ import annotations

import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile

from serve_app.traffic.routing import RoutingTable
from tests.clips import tone
from tests.test_lifecycle import Client, make_app, tiny
from tests.test_routing import within_binomial
from tests.test_stream import next_event, open_stream
from tests.traffic import Background, Traffic
from tests.waiting import eventually, wait_for_metrics

APP = "rollouts"
PREFIX = "/ro"
VARIANTS = ["large", "large_ft"]


BASELINE = {"default_version": "large"}  # no aliases, no shadow: what each test starts from


@pytest.fixture(scope="module")
def rollouts_app(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout-checkpoints")
    app = make_app(root, name=APP, prefix=PREFIX, variants=("large",), large=tiny(root, 12))
    # The fine-tuned checkpoint is just another variant: its args and its deployment.
    app["args"]["variants"]["large_ft"] = dict(app["args"]["variants"]["large"])
    large = next(d for d in app["deployments"] if d["name"] == "large")
    app["deployments"].append({**copy.deepcopy(large), "name": "large_ft",
                               "user_config": tiny(root, 13)})
    cluster.put(app)
    assert cluster.wait_for(APP, ("RUNNING", "DEPLOY_FAILED")).status == "RUNNING"
    yield Client(cluster.url, PREFIX)
    cluster.remove(APP)


@pytest.fixture
def rollouts(cluster, rollouts_app):
    """The module's app; the router back to BASELINE after each test (its shadow statistics
    start over with the next shadow a test sets)."""
    yield rollouts_app
    set_router(cluster, rollouts_app, BASELINE)


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("rollout-clips") / "half-second.wav"
    soundfile.write(path, tone(0.5, 16_000), 16_000)
    return path.read_bytes()


def set_router(cluster, client: Client, user_config: dict) -> None:
    """Deploy the app with this Router user_config (variants unchanged) and wait until the
    router serves it."""
    app = cluster.apps[APP]
    cluster.put({**app, "deployments": [{**d, "user_config": user_config}
                                        if d["name"] == "Router" else d
                                        for d in app["deployments"]]})
    expected = RoutingTable(user_config["default_version"], user_config.get("aliases", {}),
                            VARIANTS).fractions()

    def taken() -> bool:
        body = client.http.get("/v1/rollouts").json()
        assert body["routes"] == expected and set(body["shadow"]) == set(
            user_config.get("shadow", {})), body
        return True

    eventually(taken, f"the router taking {user_config}", 60, interval_s=0.2)


def post(http: httpx.Client, wav: bytes, version: str | None = None,
         key: str | None = None) -> httpx.Response:
    return http.post("/v1/predict", files={"file": ("c.wav", wav)},
                     data={"model_version": version} if version else {},
                     headers={"x-session-key": key} if key else {})


def test_weighted_split_sticky_sessions_and_routed_by(cluster, rollouts, short_clip):
    weights = {"large": 70, "large_ft": 30}
    set_router(cluster, rollouts, {"default_version": "large",
                                   "aliases": {"canary": weights, "stable": "large"}})
    assert rollouts.http.get("/v1/rollouts").json() == {
        "routes": {"canary": {"large": 0.7, "large_ft": 0.3}, "stable": {"large": 1.0}},
        "shadow": {}}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(rollouts.http, short_clip, "canary"), range(200)))
    assert {a.status_code for a in answers} == {200}
    bodies = [a.json() for a in answers]
    assert {b["routed_by"] for b in bodies} == {"canary"}
    assert all(b["model"]["variant"] == b["model_version"] for b in bodies)
    served = [b["model_version"] for b in bodies]
    assert within_binomial(served.count("large_ft"), len(served), 0.3), served.count("large_ft")
    # Each variant answered with its own checkpoint: one set of scores per variant.
    scores = {v: {tuple(b["scores"].values()) for b in bodies if b["model_version"] == v}
              for v in VARIANTS}
    assert len(scores["large"]) == len(scores["large_ft"]) == 1
    assert scores["large"] != scores["large_ft"]

    # A session key keeps its variant, the one the consistent hash gives.
    table = RoutingTable("large", {"canary": weights}, VARIANTS)
    keys = [f"session-{i}" for i in range(16)]
    expected = {key: table.resolve("canary", key).variant for key in keys}
    assert set(expected.values()) == set(VARIANTS)
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            got = dict(zip(keys, pool.map(
                lambda key: post(rollouts.http, short_clip, "canary", key).json()
                ["model_version"], keys)))
            assert got == expected

    # A stream is routed the same way: the session key as a header, or (browsers) a parameter.
    for key in keys[:4]:
        for headers, query in (({"X-Session-Key": key}, {}), ({}, {"session_key": key})):
            with open_stream(rollouts.url, headers, model_version="canary", **query) as (_, ready):
                assert (ready["model_version"], ready["routed_by"]) == (expected[key], "canary")

    for version, variant in (("stable", "large"), ("large_ft", "large_ft"), (None, "large")):
        body = post(rollouts.http, short_clip, version, "session-0").json()
        assert (body["model_version"], body["routed_by"]) == (variant, None)
    parameters = rollouts.http.get("/openapi.json").json()["paths"]["/v1/predict"]["post"][
        "parameters"]
    assert ("X-Session-Key", "header") in {(p["name"], p["in"]) for p in parameters}
    wait_for_metrics(cluster.metrics_url,  # the requests count per route
                     ("ray_emotion2vec_requests_total", {"application": APP, "route": "canary"}),
                     interval_s=1)


def test_canary_ramp_by_redeploys_under_load_fails_no_request(cluster, rollouts, short_clip):
    """default_version is the weighted alias; large_ft goes 0 -> 10 -> 50 -> 100 %."""
    keys = [f"user-{i}" for i in range(40)]

    def key_of(sender: int, number: int) -> str | None:
        """Every other request carries a session key, the others none."""
        return keys[(sender + 3 * number) % len(keys)] if number % 2 else None

    def router(share: int) -> dict:
        return {"default_version": "canary",
                "aliases": {"canary": {"large": 100 - share, "large_ft": share}}}

    set_router(cluster, rollouts, router(0))
    phases = []  # (share, seen_at, next_change_at)
    with Traffic(cluster.url + PREFIX, lambda http, sender, number: post(
            http, short_clip, key=key_of(sender, number)), senders=3, per_sender=3000,
                 max_s=150, read=lambda response: response.json()["model_version"]) as traffic:
        for share in (0, 10, 50, 100):
            if phases:
                phases[-1][2] = time.monotonic()
            set_router(cluster, rollouts, router(share))
            seen_at = time.monotonic()
            phases.append([share, seen_at, None])
            traffic.wait_for(15, since=seen_at)  # at least 12 answered under each split
        phases[-1][2] = time.monotonic()
    assert not traffic.failures(), [str(f) for f in traffic.failures()[:3]]
    for share, seen_at, changed_at in phases:
        inside = [o for o in traffic.since(seen_at) if o.ended < changed_at]
        assert len(inside) >= 12, (share, len(inside))
        table = RoutingTable("canary", router(share)["aliases"], VARIANTS)
        for outcome in inside:
            key = key_of(outcome.sender, outcome.number)
            if key is not None:
                assert outcome.value == table.resolve(None, key).variant, (share, key, outcome)
        served = {outcome.value for outcome in inside}
        if share == 0:
            assert served == {"large"}
        if share == 100:
            assert served == {"large_ft"}


def clip_set(folder: Path, clips: dict[str, Path]) -> list[Path]:
    """The shared test clips plus tones and noise of varied pitch and level."""
    extra = []
    for index, (freq, level) in enumerate([(120, 0.3), (300, 0.3), (600, 1.0), (90, 0.05)]):
        path = folder / f"shadow-{index}.wav"
        soundfile.write(path, np.clip(tone(1.0, 16_000, freq, index) * level / 0.3, -1, 1),
                        16_000)
        extra.append(path)
    noise = folder / "shadow-noise.wav"
    soundfile.write(noise, np.random.default_rng(7).uniform(-0.9, 0.9, 16_000), 16_000)
    return [*clips.values(), *extra, noise]


def wait_shadow(client: Client, primary: str, done, timeout_s: float = 60) -> dict:
    def reported() -> dict:
        stats = client.http.get("/v1/rollouts").json()["shadow"][primary]
        assert done(stats), stats
        return stats

    return eventually(reported, f"the shadow statistics of {primary}", timeout_s,
                      interval_s=0.2)


def test_shadow_reports_what_calling_both_variants_gives(cluster, rollouts, clips, tmp_path):
    set_router(cluster, rollouts, {"default_version": "large", "shadow": {"large": "large_ft"}})
    assert wait_shadow(rollouts, "large", lambda s: True) == {
        "target": "large_ft", "compared": 0, "dropped": 0, "errors": 0, "top1_agreement": None,
        "mean_abs_score_diff": None, "max_abs_score_diff": None, "confusion": {}}
    http = rollouts.http
    # Refused requests, and a request large did not answer, start no shadow.
    assert post(http, b"not audio at all" * 10).status_code == 415
    assert post(http, clips["tone_16k_mono_wav"].read_bytes(), "xl").status_code == 400
    assert post(http, clips["tone_16k_mono_wav"].read_bytes()[:600]).status_code == 422
    assert post(http, clips["tone_16k_mono_wav"].read_bytes(), "large_ft").status_code == 200

    paths = clip_set(tmp_path, clips)
    shadowed = []
    for path in paths:
        response = post(http, path.read_bytes())
        assert response.status_code == 200, response.text
        shadowed.append(response.json())
    stats = wait_shadow(rollouts, "large",
                        lambda s: s["compared"] + s["errors"] + s["dropped"] >= len(paths))
    time.sleep(0.5)  # nothing else arrives
    assert http.get("/v1/rollouts").json()["shadow"]["large"] == stats
    assert (stats["compared"], stats["errors"], stats["dropped"]) == (len(paths), 0, 0)

    # The same clips to both variants directly, and the statistics computed here.
    direct = {v: [post(http, p.read_bytes(), v).json() for p in paths] for v in VARIANTS}
    # The shadow did not change the primary's answers.
    assert [b["scores"] for b in shadowed] == [b["scores"] for b in direct["large"]]
    confusion: dict[str, dict[str, int]] = {}
    agree, means, maxima = 0, [], []
    for ours, theirs in zip(direct["large"], direct["large_ft"]):
        agree += ours["emotion"] == theirs["emotion"]
        row = confusion.setdefault(ours["emotion"], {})
        row[theirs["emotion"]] = row.get(theirs["emotion"], 0) + 1
        diffs = np.abs(np.array(list(ours["scores"].values())) -
                       np.array([theirs["scores"][k] for k in ours["scores"]]))
        means.append(diffs.mean())
        maxima.append(diffs.max())
    assert stats["top1_agreement"] == agree / len(paths)
    assert stats["confusion"] == confusion
    assert stats["mean_abs_score_diff"] == pytest.approx(np.mean(means), abs=1e-9)
    assert stats["max_abs_score_diff"] == pytest.approx(max(maxima), abs=1e-12)
    assert stats["max_abs_score_diff"] > 0

    # A stream answered by large is shadowed too, once, on the whole stream's audio.
    raw = (tone(1.0, 16_000) * 32767).astype("<i2").tobytes()
    with open_stream(rollouts.url) as (ws, ready):
        assert ready["model_version"] == "large"
        ws.send(raw)
        ws.send(json.dumps({"type": "end"}))
        while (event := next_event(ws))["type"] != "result":
            assert event["type"] == "window", event
    # Compared so far: the shadowed clips, and the direct calls to large above.
    wait_shadow(rollouts, "large", lambda s: s["compared"] == 2 * len(paths) + 1)


def test_a_full_shadow_queue_drops_and_counts(cluster, rollouts, short_clip, tmp_path):
    set_router(cluster, rollouts, {"default_version": "large", "shadow": {"large": "large_ft"},
                                   "shadow_max_pending": 1})
    before = wait_shadow(rollouts, "large", lambda s: True)
    long_clip = tmp_path / "60s.wav"
    soundfile.write(long_clip, tone(60.0, 16_000), 16_000)  # over a second on the tiny model

    def occupy_large_ft() -> int:
        with httpx.Client(base_url=cluster.url + PREFIX, timeout=120) as http:
            return post(http, long_clip.read_bytes(), "large_ft").status_code

    occupier = Background(occupy_large_ft)
    try:
        rollouts.wait("large_ft", lambda info: info["in_flight"] >= 1, timeout_s=30)
        # The first shadow waits behind the long request; the next ones find no room.
        codes = [post(rollouts.http, short_clip).status_code for _ in range(4)]
        assert not occupier.done(), "the long request ended too soon: inconclusive"
    finally:
        long_status = occupier.result(timeout_s=120)
    assert long_status == 200
    assert codes == [200] * 4
    stats = wait_shadow(rollouts, "large",
                        lambda s: s["compared"] + s["errors"] > before["compared"] +
                        before["errors"])
    assert stats["dropped"] - before["dropped"] == 3
    assert (stats["compared"] - before["compared"], stats["errors"]) == (1, before["errors"])
    # Shadow outcomes and score differences are exported, per target.
    shadow = {"application": APP, "primary": "large", "target": "large_ft"}
    wait_for_metrics(cluster.metrics_url,
                     ("ray_emotion2vec_shadow_requests_total", {**shadow, "outcome": "dropped"}),
                     ("ray_emotion2vec_shadow_score_diff_bucket", shadow), interval_s=1)
