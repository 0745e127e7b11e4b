"""API keys and quotas: the access logic on its own (a clock of the test's own), then through
the Serve app with keys on (the `keyed` fixture) beside the open main app."""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import math
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from serve_app.api.responses import without_paths
from serve_app.config import RouterSettings
from serve_app.traffic import access
from serve_app.traffic.access import AccessControl, AccessDenied
from tests.waiting import eventually, wait_for_metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def control(clock: Clock | None = None, **settings) -> AccessControl:
    gate = AccessControl(clock or Clock())
    gate.configure(RouterSettings(**settings))
    return gate


def refused(call, *args, status: int = 401) -> AccessDenied:
    with pytest.raises(AccessDenied) as caught:
        call(*args)
    assert caught.value.status == status
    return caught.value


# -- the logic, without a cluster ---------------------------------------------------------------
def test_no_keys_means_open():
    gate = control()
    assert not gate.enabled
    admission = gate.admit({})
    assert (admission.key_id, admission.label, admission.headers) == (None, "anonymous", {})


def test_key_forms_and_refusals():
    gate = control(api_keys={"alpha": {"sha256": sha("k-alpha")},
                             "beta": {"sha256": sha("k-beta").upper()}})
    assert gate.authenticate({"Authorization": "Bearer k-alpha"}) == "alpha"
    assert gate.authenticate({"authorization": "bearer  k-beta "}) == "beta"
    assert gate.authenticate({"X-API-Key": "k-alpha"}) == "alpha"
    # Bearer wins over X-API-Key; a non-Bearer Authorization leaves X-API-Key to decide.
    assert gate.authenticate({"Authorization": "Bearer k-beta", "X-API-Key": "k-alpha"}) == "beta"
    assert gate.authenticate({"Authorization": "Basic eDp5", "X-API-Key": "k-alpha"}) == "alpha"
    # The query parameter counts only where the caller passes it (the stream).
    assert gate.authenticate({}, query_api_key="k-beta") == "beta"
    missing = refused(gate.authenticate, {})
    assert missing.code == "unauthorized" and missing.key_label == "invalid"
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="emotion2vec-serve"'
    for headers, presented in [({"Authorization": "Bearer k-gamma"}, "k-gamma"),
                               ({"X-API-Key": "k-alph"}, "k-alph"),
                               ({"Authorization": "Bearer"}, None),
                               ({"Authorization": "Basic eDp5"}, "eDp5"),
                               ({"Authorization": "Bearer two words"}, "two"),
                               ({"X-API-Key": "x" * 257}, "x" * 257),
                               ({"X-API-Key": "k\u00e9y"}, "k\u00e9y")]:
        denied = refused(gate.authenticate, headers)
        assert denied.headers["WWW-Authenticate"].endswith('error="invalid_token"'), headers
        assert presented is None or presented not in json.dumps(denied.body(),
                                                                ensure_ascii=False)


def test_request_quota_refills_and_reports_headers():
    clock = Clock()
    # 30 a minute in a 4 s window: a bucket of 2, one more every 2 s.
    gate = control(clock, api_keys={"beta": {"sha256": sha("k"), "requests_per_minute": 30}},
                   quota_window_s=4)
    key = {"X-API-Key": "k"}
    first, second = gate.admit(key), gate.admit(key)
    assert first.headers == {"X-RateLimit-Limit": "2", "X-RateLimit-Remaining": "1",
                             "X-RateLimit-Reset": "2", "X-RateLimit-Resource": "requests"}
    assert second.headers["X-RateLimit-Remaining"] == "0"
    assert second.headers["X-RateLimit-Reset"] == "4"
    over = refused(gate.admit, key, status=429)
    assert over.code == "rate_limited" and over.key_label == "beta"
    assert over.headers["Retry-After"] == "2" and over.headers["X-RateLimit-Remaining"] == "0"
    clock.now += 1.5
    assert refused(gate.admit, key, status=429).headers["Retry-After"] == "1"  # 0.5 s left
    clock.now += 0.5
    assert gate.admit(key).headers["X-RateLimit-Remaining"] == "0"  # refused ones cost nothing
    clock.now += 3600
    assert gate.admit(key).headers["X-RateLimit-Remaining"] == "1"  # full again, never more


def test_audio_quota_serves_the_crossing_request_then_waits_out_the_debt():
    clock = Clock()
    # 30 s of audio a minute in a 4 s window: 2 s at once, 0.5 s back each second.
    gate = control(clock, api_keys={"gamma": {"sha256": sha("k"),
                                              "audio_seconds_per_minute": 30}},
                   quota_window_s=4)
    key = {"X-API-Key": "k"}
    admission = gate.admit(key)
    assert admission.headers["X-RateLimit-Resource"] == "audio_seconds"
    assert admission.headers["X-RateLimit-Limit"] == "2"
    gate.charge_audio("gamma", 1.5)
    gate.admit(key)  # 0.5 s left: admitted, whatever its length
    gate.charge_audio("gamma", 2.0)  # 1.5 s over: a debt
    over = refused(gate.admit, key, status=429)
    assert over.headers["Retry-After"] == "4"  # 1.5 s of debt at 0.5 s a second, and a bit
    assert over.headers["X-RateLimit-Remaining"] == "0" and "30 seconds of audio" in over.message
    refused(gate.check_audio, "gamma", status=429)
    clock.now += 3.0
    refused(gate.admit, key, status=429)
    clock.now += 1.0
    gate.admit(key)
    gate.check_audio("gamma")
    gate.check_audio(None)  # access control off, or no audio quota: nothing to check
    gate.charge_audio(None, 100.0)


def test_redeploy_rotates_keys_and_keeps_quota_state():
    clock = Clock()
    gate = control(clock, api_keys={"beta": {"sha256": sha("old"), "requests_per_minute": 1}})
    gate.admit({"X-API-Key": "old"})
    gate.configure(RouterSettings(api_keys={"beta": {"sha256": sha("new"),
                                                     "requests_per_minute": 1}}))
    refused(gate.authenticate, {"X-API-Key": "old"})
    refused(gate.admit, {"X-API-Key": "new"}, status=429)  # same key id, same limits: spent
    gate.configure(RouterSettings(api_keys={"beta": {"sha256": sha("new"),
                                                     "requests_per_minute": 2}}))
    gate.admit({"X-API-Key": "new"})  # new limits: a fresh bucket


def test_key_file_is_read_checked_and_followed(tmp_path):
    clock = Clock()
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"filed": {"sha256": sha("k-file")}}))
    gate = control(clock, api_keys={"inline": {"sha256": sha("k-inline")}},
                   api_keys_file=str(path))
    assert gate.authenticate({"X-API-Key": "k-file"}) == "filed"
    assert gate.authenticate({"X-API-Key": "k-inline"}) == "inline"

    # An edited file applies within FILE_CHECK_S, without a redeploy (JSON is fine too).
    path.write_text(json.dumps({"other": {"sha256": sha("k-other")}}))
    assert gate.authenticate({"X-API-Key": "k-file"}) == "filed"  # not checked yet
    clock.now += access.FILE_CHECK_S
    assert gate.authenticate({"X-API-Key": "k-other"}) == "other"
    refused(gate.authenticate, {"X-API-Key": "k-file"})

    # A broken edit keeps the keys read before; a broken file at configure is refused.
    path.write_text("other: {sha256: e2v_pasted-the-key-itself}")
    clock.now += access.FILE_CHECK_S
    assert gate.authenticate({"X-API-Key": "k-other"}) == "other"
    with pytest.raises(ValueError, match=r"keys.yaml: other.sha256") as caught:
        gate.configure(RouterSettings(api_keys_file=str(path)))
    assert "pasted-the-key" not in str(caught.value)
    assert gate.authenticate({"X-API-Key": "k-inline"}) == "inline"  # unchanged
    with pytest.raises(ValueError, match=r"missing.yaml: cannot read it .*keys new"):
        control(api_keys_file=str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("a: [unclosed")
    with pytest.raises(ValueError, match="not YAML or JSON"):
        control(api_keys_file=str(tmp_path / "bad.yaml"))

    # Ambiguous tables are refused; an empty file means no key is valid, not an open API.
    path.write_text(yaml.safe_dump({"inline": {"sha256": sha("k-x")}}))
    with pytest.raises(ValueError, match=r"\['inline'\] are both"):
        control(api_keys={"inline": {"sha256": sha("k-y")}}, api_keys_file=str(path))
    with pytest.raises(ValueError, match="same sha256"):
        control(api_keys={"a": {"sha256": sha("k")}, "b": {"sha256": sha("k")}})
    path.write_text("")
    empty = control(api_keys_file=str(path))
    assert empty.enabled
    refused(empty.authenticate, {"X-API-Key": "k-x"})


def test_key_ids_are_checked():
    with pytest.raises(ValueError, match="API key id 'invalid'"):
        RouterSettings(api_keys={"invalid": {"sha256": sha("k")}})
    with pytest.raises(ValueError, match="API key id 'a b'"):
        RouterSettings(api_keys={"a b": {"sha256": sha("k")}})
    with pytest.raises(ValueError):
        RouterSettings(api_keys={"a": {"sha256": "e2v_not-a-digest"}})


def test_paths_are_cut_to_their_last_part():
    # A directory by its name; a file by its directory's name and its own.
    info = {"source": "/srv/models/tiny-seed1", "hub": "iic/emotion2vec_plus_large",
            "last_swap": {"requested": {"source": "~/.cache/e2v/base-seed0"},
                          "error": "model directory /srv/x/missing does not exist; see "
                                   "https://modelscope.cn/models/iic/x and/or 1/2"},
            "trace": ['File "/opt/app/serve_app/variant.py", line 5'],
            "weights": "cannot read /srv/models/large-ft/model.pt: truncated", "n": 3}
    assert without_paths(info) == {
        "source": "tiny-seed1", "hub": "iic/emotion2vec_plus_large",
        "last_swap": {"requested": {"source": "base-seed0"},
                      "error": "model directory missing does not exist; see "
                               "https://modelscope.cn/models/iic/x and/or 1/2"},
        "trace": ['File "serve_app/variant.py", line 5'],
        "weights": "cannot read large-ft/model.pt: truncated", "n": 3}


# -- through the service --------------------------------------------------------------------------
def predict(url: str, clip, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/predict", files={"file": ("a.wav", clip.read_bytes())},
                      headers=headers or {}, timeout=60)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_every_api_route_needs_a_key_and_the_rest_stays_open(keyed, clips):
    spec = httpx.get(keyed.url + "/openapi.json", timeout=30).json()
    routes = [(method.upper(), path) for path, methods in spec["paths"].items()
              if path.startswith("/v1/") for method in methods]
    assert ("POST", "/v1/predict") in routes and ("GET", "/v1/models") in routes
    # A body over max_upload_bytes: 401 comes first, before anything is read.
    body = b"\0" * (3 * 1024 * 1024)
    wrong = [{}, bearer("e2v_wrong"), {"X-API-Key": "e2v_wrong"}, {"Authorization": "Bearer"},
             {"Authorization": "Basic YTpi"}, {"Authorization": "Bearer a b"},
             {"X-API-Key": "x" * 300}]
    for method, path in routes:
        for headers in wrong:
            response = httpx.request(method, keyed.url + path, headers=headers, timeout=30,
                                     content=body if method == "POST" else None)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")
    for path in ("/health", "/ready", "/", "/web/app.js", "/web/style.css", "/docs",
                 "/openapi.json"):
        assert httpx.get(keyed.url + path, timeout=30).status_code == 200, path


def test_each_key_form_is_served(keyed, clips):
    key = keyed.keys["alpha"]
    for headers in (bearer(key), {"authorization": f"bearer {key}"}, {"X-API-Key": key}):
        response = httpx.get(keyed.url + "/v1/models", headers=headers, timeout=30)
        assert response.status_code == 200, headers
        assert list(response.json()["variants"]) == ["base"]
    response = predict(keyed.url, clips["tone_16k_mono_wav"], {"X-API-Key": key})
    assert response.status_code == 200 and response.json()["model_version"] == "base"
    assert "x-ratelimit-limit" not in response.headers  # alpha has no quotas
    # A key from the key file.
    assert httpx.get(keyed.url + "/v1/models", headers=bearer(keyed.keys["cli"]),
                     timeout=30).status_code == 200
    # The main app stays open.
    assert httpx.get(keyed.cluster.url + "/v1/models", timeout=30).status_code == 200


def test_request_quota_answers_429_with_a_true_retry_after(keyed, clips):
    """beta: 20 requests a minute in a 6 s window: 2 at once, then one every 3 s."""
    headers = {"X-API-Key": keyed.keys["beta"]}
    models = keyed.url + "/v1/models"
    sent = time.monotonic()
    first = httpx.get(models, headers=headers, timeout=30)
    received = time.monotonic()
    assert first.status_code == 200
    assert (first.headers["x-ratelimit-limit"], first.headers["x-ratelimit-remaining"]) == \
        ("2", "1")
    assert httpx.get(models, headers=headers, timeout=30).headers["x-ratelimit-remaining"] == "0"
    asked = time.monotonic()
    over = httpx.post(keyed.url + "/v1/predict", content=b"not audio: never decoded",
                      headers=headers, timeout=30)
    answered = time.monotonic()
    assert over.status_code == 429, over.text  # before the body is read or decoded
    assert over.json()["error"]["code"] == "rate_limited"
    # The next token comes 3 s after the first request was admitted (between sent and
    # received): Retry-After is the rest of that, rounded up.
    retry_after = int(over.headers["retry-after"])
    assert math.ceil(sent + 3 - answered) <= retry_after <= math.ceil(received + 3 - asked)
    assert over.headers["x-ratelimit-remaining"] == "0"
    assert over.headers["x-ratelimit-resource"] == "requests"
    assert int(over.headers["x-ratelimit-reset"]) >= retry_after
    time.sleep(retry_after)
    again = httpx.get(models, headers=headers, timeout=30)
    assert again.status_code == 200, again.text


def test_audio_quota(keyed, clips):
    """gamma: 30 s of audio a minute in a 6 s window: 3 s at once, 0.5 s back a second."""
    headers = bearer(keyed.keys["gamma"])
    clip = clips["tone_16k_mono_wav"]  # 2 s
    first = predict(keyed.url, clip, headers)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-resource"] == "audio_seconds"
    assert first.headers["x-ratelimit-limit"] == "3"
    assert predict(keyed.url, clip, headers).status_code == 200  # crosses the quota: served
    over = predict(keyed.url, clip, headers)
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
    retry_after = int(over.headers["retry-after"])
    assert 1 <= retry_after <= 3  # 1 s of debt at 0.5 s a second, less what came back since
    assert "seconds of audio" in over.json()["error"]["message"]
    time.sleep(retry_after)
    assert predict(keyed.url, clip, headers).status_code == 200


def test_rotation_by_redeploy_is_live(keyed, clips):
    from ray.util import list_named_actors

    def routers() -> set[str]:
        return {actor["name"] for actor in list_named_actors(all_namespaces=True)
                if "Router" in actor["name"] and f"{keyed.app['name']}#" in actor["name"]}

    old_key = keyed.keys["rotate"]
    assert httpx.get(keyed.url + "/v1/models", headers=bearer(old_key), timeout=30) \
        .status_code == 200
    before = routers()
    assert len(before) == 1
    from serve_app.tools.cli import new_key

    new, line = new_key("rotate", None, None)
    rotated = copy.deepcopy(keyed.app)
    router = next(d for d in rotated["deployments"] if d["name"] == "Router")
    router["user_config"]["api_keys"].update(yaml.safe_load(line))
    keyed.cluster.put(rotated)
    try:
        wait_until_accepted(keyed, new)
        assert httpx.get(keyed.url + "/v1/models", headers=bearer(old_key),
                         timeout=30).status_code == 401
        assert routers() == before  # the same replica: reconfigured in place, not restarted
    finally:  # the keys as the session's other tests know them
        keyed.cluster.put(keyed.app)
        wait_until_accepted(keyed, old_key)


def wait_until_accepted(keyed, key: str, timeout_s: float = 60) -> None:
    eventually(lambda: httpx.get(keyed.url + "/v1/models", headers=bearer(key),
                                 timeout=30).status_code == 200,
               "the key accepted", timeout_s)


def test_logs_and_metrics_name_key_ids_never_keys(keyed, clips):
    request_id = "keyed-log-0001"
    wrong = "e2v_this-key-is-not-valid"
    predict(keyed.url, clips["tone_16k_mono_wav"],
            {"X-API-Key": keyed.keys["alpha"], "X-Request-ID": request_id})
    predict(keyed.url, clips["tone_16k_mono_wav"],
            {"X-API-Key": wrong, "X-Request-ID": request_id + "-bad"})
    # meter's bucket holds 2 requests: the third within seconds is over its quota.
    metered = [httpx.get(keyed.url + "/v1/models", headers=bearer(keyed.keys["meter"]),
                         timeout=30).status_code for _ in range(3)]
    assert metered[-1] == 429, metered
    pattern = os.path.join(keyed.cluster.temp_dir, "session_latest", "logs", "serve",
                           f"replica_{keyed.app['name']}_Router_*.log")

    def logged() -> tuple[dict[str, dict], str]:
        text = "".join(Path(path).read_text(encoding="utf-8") for path in glob.glob(pattern))
        lines = {entry["request_id"]: entry for entry in
                 (json.loads(line[line.index("{"):]) for line in text.splitlines()
                  if f'"request_id": "{request_id}' in line)}
        assert len(lines) >= 2, lines
        return lines, text

    lines, text = eventually(logged, "both requests in the router's log", 30, interval_s=0.5)
    assert (lines[request_id]["key"], lines[request_id]["status"]) == ("alpha", 200)
    assert (lines[request_id + "-bad"]["key"], lines[request_id + "-bad"]["status"]) == \
        ("invalid", 401)
    assert not [key for key in (*keyed.keys.values(), wrong) if key in text]

    scraped = wait_for_metrics(
        keyed.cluster.metrics_url,
        ("ray_emotion2vec_key_requests_total", {"key": "alpha", "outcome": "admitted"}),
        ("ray_emotion2vec_key_requests_total", {"key": "invalid", "outcome": "unauthorized"}),
        ("ray_emotion2vec_key_requests_total", {"key": "meter", "outcome": "rate_limited"}),
        ("ray_emotion2vec_key_audio_seconds_total", {"key": "alpha"}))
    assert not [key for key in keyed.keys.values() if key in scraped.text]  # anywhere in it


def test_a_missing_key_file_refuses_the_config_not_the_keys(keyed, tmp_path):
    """A redeploy naming a key file that is not there fails (Serve says why); it never serves
    the API open. Putting the good config back serves the keys again."""
    broken = copy.deepcopy(keyed.app)
    router = next(d for d in broken["deployments"] if d["name"] == "Router")
    router["user_config"]["api_keys_file"] = str(tmp_path / "nowhere.yaml")
    started = time.monotonic()
    keyed.cluster.put(broken)
    try:
        status = keyed.cluster.wait_for(keyed.app["name"], ("DEPLOY_FAILED", "UNHEALTHY"),
                                        timeout_s=120)
        assert "nowhere.yaml: cannot read it" in status.deployments["Router"].message
        assert httpx.get(keyed.url + "/v1/models", timeout=30).status_code != 200
    finally:
        keyed.cluster.put(keyed.app)
    print(f"refused after {time.monotonic() - started:.1f} s")
    assert keyed.cluster.wait_for(keyed.app["name"], ("RUNNING",)).status == "RUNNING"
    assert httpx.get(keyed.url + "/v1/models", headers=bearer(keyed.keys["alpha"]),
                     timeout=30).status_code == 200
    print(f"restored after {time.monotonic() - started:.1f} s")


def test_the_stream_needs_a_key_and_counts_its_audio(keyed, clips):
    """WS /v1/stream: no, wrong or malformed key -> unauthorized, close 1008; a key in the
    Authorization header or (browsers) the api_key query parameter -> ready. `api_key` counts
    on the stream only. Streamed audio is charged as it arrives: streamer has 3 s at once."""
    from tests.test_stream import open_stream, refused

    end = json.dumps({"type": "end"})
    for headers, query in [({}, {}), (bearer("e2v_wrong"), {}), ({}, {"api_key": "e2v_wrong"}),
                           ({"Authorization": "Bearer a b"}, {})]:
        event, code = refused(keyed.url, end, headers=headers, **query)
        assert (event["error"]["code"], code) == ("unauthorized", 1008), (headers, query)
    key = keyed.keys["alpha"]
    for headers, query in [(bearer(key), {}), ({"X-API-Key": key}, {}), ({}, {"api_key": key})]:
        with open_stream(keyed.url, headers=headers, **query) as (_ws, ready):
            assert ready["model_version"] == "base"
    # On the HTTP routes the query parameter is no key.
    response = httpx.get(keyed.url + "/v1/models", params={"api_key": key}, timeout=30)
    assert response.status_code == 401
    # 4 s of audio against 3 s of quota: the stream ends with rate_limited, try later.
    second = np.zeros(16_000, dtype="<i2").tobytes()
    event, code = refused(keyed.url, *[second] * 4, end,
                          headers=bearer(keyed.keys["streamer"]))
    assert (event["error"]["code"], code) == ("rate_limited", 1013)
    assert event["error"]["retry_after_s"] >= 1
