"""Jobs over HTTP on the session's cluster (docs/jobs.md): each job a Ray Job whose driver runs
the batch pipeline; rows equal to POST /v1/predict; signed callbacks, retried; a job outlives
the Router replica that admitted it; cancelling; keys see only their own jobs; a key's audio
quota stops its job. (A job over the batch tests' folder, compared with `batch`'s own rows, is
in tests/test_batch.py.)"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray

from serve_app.jobs.callbacks import SIGNATURE_HEADER, verify
from tests.conftest import CALLBACK_SECRET
from tests.head_files import head_bytes
from tests.jobs_util import CallbackReceiver, all_rows, driver_log, submit, wait_job
from tests.waiting import eventually


@pytest.fixture(scope="module")
def folder(clips, tmp_path_factory) -> Path:
    """A few clips in a folder with a sub-folder, and a file that is not audio."""
    root = tmp_path_factory.mktemp("job-inputs")
    (root / "more").mkdir()
    for index, (name, path) in enumerate(sorted(clips.items())[:4]):
        shutil.copy(path, (root if index % 2 else root / "more") / f"{name}{path.suffix}")
    (root / "readme.txt").write_text("not audio")
    return root


def _audio(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".txt")


def _copies(source: Path, folder: Path, count: int) -> Path:
    """A folder of `count` copies of one clip (hard links: no bytes copied)."""
    folder.mkdir()
    for index in range(count):
        os.link(source, folder / f"clip-{index:02d}{source.suffix}")
    return folder


def _check_rows_equal_predict(rows: list[dict], files: dict[str, Path], client: httpx.Client,
                              variant: str, **fields: str) -> None:
    assert sorted(row["path"] for row in rows) == sorted(files)
    for row in rows:
        path = files[row["path"]]
        response = client.post("/v1/predict", files={"file": (path.name, path.read_bytes())},
                               data={"model_version": variant, **fields})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (row["status"], row["model_version"]) == ("ok", variant), row
        scores = [row[f"score_{name}"] for name in body["scores"]]
        assert np.abs(np.subtract(scores, list(body["scores"].values()))).max() <= 1e-4
        assert row["duration_s"] == body["audio"]["duration_s"]


def _signed_summaries(receiver: CallbackReceiver) -> list[dict]:
    summaries = []
    for headers, body in receiver.received:
        signature = {k.lower(): v for k, v in headers.items()}[SIGNATURE_HEADER.lower()]
        assert verify(CALLBACK_SECRET, signature, body), signature
        assert not verify("another-secret-entirely-000", signature, body)
        summaries.append(json.loads(body))
    return summaries


def test_a_folder_job_gives_predicts_rows_and_one_signed_callback_after_two_500s(
        service, client, folder):
    files = {str(path.resolve()): path for path in _audio(folder)}
    with CallbackReceiver([500, 500]) as receiver:
        accepted = submit(client, inputs=[str(folder)], model_version="base",
                          callback_url=receiver.hook, metadata={"batch": "q3", "n": 1})
        job = wait_job(client, accepted["job_id"])
        assert job["state"] == "succeeded", f"{job['error']}\n{driver_log(job['job_id'])}"
        assert job["files"] == {"total": len(files), "done": len(files), "failed": 0}
        assert job["audio_s"] > 0 and job["finished"] >= job["started"]
        eventually(lambda: (client.get(accepted["status_url"]).json()["callback"] or {})
                   .get("delivered"), "the callback's third attempt", timeout_s=30)
        callback = client.get(accepted["status_url"]).json()["callback"]
        assert [a["status"] for a in callback["attempts"]] == [500, 500, 200], callback
        assert len(receiver.received) == 3 and not receiver.errors
        summaries = _signed_summaries(receiver)
    assert all(s == summaries[0] for s in summaries)  # the same summary, each time signed
    summary = summaries[0]
    assert (summary["job_id"], summary["state"], summary["metadata"]) == (
        accepted["job_id"], "succeeded", {"batch": "q3", "n": 1})
    assert summary["files"]["done"] == len(files)
    rows = all_rows(client, accepted["job_id"])
    _check_rows_equal_predict(rows, files, client, "base")
    listed = client.get(f"/v1/jobs/{accepted['job_id']}/results",
                        params={"format": "parquet"}).json()["parts"]
    assert listed and all(part["name"].endswith(".parquet") for part in listed)
    first = client.get(listed[0]["url"])
    assert first.status_code == 200 and first.content[:4] == b"PAR1"
    assert accepted["job_id"] in [j["job_id"] for j in client.get("/v1/jobs").json()["jobs"]]


def test_an_uploaded_zip_and_a_file_uri_give_the_same_rows_and_a_silent_receiver_is_recorded(
        service, client, folder, tmp_path):
    files = _audio(folder)
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as archive:
        for path in files:
            archive.write(path, f"calls/{path.relative_to(folder).as_posix()}")
    with CallbackReceiver(hang_s=3.0) as receiver:
        response = client.post("/v1/jobs", files={"archive": ("calls.zip", packed.getvalue())},
                               data={"model_version": "large", "callback_url": receiver.hook,
                                     "metadata": json.dumps({"from": "zip"})})
        assert response.status_code == 202, response.text
        uploaded = response.json()
        by_uri = submit(client, inputs=[folder.resolve().as_uri()], model_version="large")
        job = wait_job(client, uploaded["job_id"])
        assert job["state"] == "succeeded", f"{job['error']}\n{driver_log(job['job_id'])}"
        eventually(lambda: len((client.get(uploaded["status_url"]).json()["callback"] or {})
                               .get("attempts", [])) == 3, "three failed deliveries",
                   timeout_s=60)
    callback = client.get(uploaded["status_url"]).json()["callback"]
    assert callback["delivered"] is False and all(
        a["status"] is None and a["error"] for a in callback["attempts"]), callback
    assert client.get(uploaded["status_url"]).json()["state"] == "succeeded"
    names = {f"calls/{path.relative_to(folder).as_posix()}": path for path in files}
    zipped = all_rows(client, uploaded["job_id"])
    _check_rows_equal_predict(zipped, names, client, "large")
    assert wait_job(client, by_uri["job_id"])["state"] == "succeeded"
    from_uri = {Path(row["path"]).name: row for row in all_rows(client, by_uri["job_id"])}
    for row in zipped:
        twin = from_uri[Path(row["path"]).name]
        assert twin["path"].startswith(str(folder.resolve()))
        assert abs(twin["confidence"] - row["confidence"]) <= 1e-6


def test_a_job_with_a_head_and_a_label_set_scores_as_predict_does(service, client, folder):
    sha256 = hashlib.sha256((service.checkpoints["base"] / "model.pt").read_bytes()).hexdigest()
    stored = client.put("/v1/heads/job-calls", content=head_bytes("job-calls", sha256, 64,
                                                                  seed=13))
    assert stored.status_code == 201, stored.text
    files = {str(path.resolve()): path for path in _audio(folder)}
    accepted = submit(client, inputs=[str(folder)], model_version="base", head="job-calls",
                      labels="satisfied,frustrated")
    job = wait_job(client, accepted["job_id"])
    assert job["state"] == "succeeded", f"{job['error']}\n{driver_log(job['job_id'])}"
    assert job["head"] == stored.json()
    rows = all_rows(client, accepted["job_id"])
    assert {row["head"] for row in rows} == {"job-calls@1"}
    assert all("score_neutral" not in row and row["emotion"] in ("satisfied", "frustrated")
               for row in rows)
    _check_rows_equal_predict(rows, files, client, "base", head="job-calls",
                              labels="satisfied,frustrated")
    refused = client.post("/v1/jobs", json={"inputs": [str(folder)], "head": "no-such-head"})
    assert (refused.status_code, refused.json()["error"]["code"]) == (404, "unknown_head")


def _router_replicas(app: str) -> list[str]:
    """The names of the app's live Router replica actors (namespace serve)."""
    return [entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry["namespace"] == "serve" and f"{app}#Router#" in entry["name"]]


def test_a_job_outlives_its_router_and_a_cancelled_job_stops(service, client, folder,
                                                             tmp_path):
    many = _copies(_audio(folder)[0], tmp_path / "many", 24)
    running = submit(client, inputs=[str(many)], model_version="base")
    doomed = submit(client, inputs=[str(many)], model_version="base")
    cancelled = client.delete(f"/v1/jobs/{doomed['job_id']}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled", cancelled.json()
    (router,) = _router_replicas("emotion2vec")
    ray.kill(ray.get_actor(router, namespace="serve"), no_restart=False)
    eventually(lambda: _router_replicas("emotion2vec") and
               httpx.get(f"{service.url}/v1/jobs/{running['job_id']}", timeout=5).status_code
               == 200, "a new Router replica answering for the job", timeout_s=120)
    job = wait_job(client, running["job_id"])
    assert job["state"] == "succeeded" and job["files"]["done"] == 24, \
        f"{job}\n{driver_log(job['job_id'])}"
    assert len(all_rows(client, running["job_id"])) == 24
    from ray._private.services import get_webui_url_from_internal_kv
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(f"http://{get_webui_url_from_internal_kv()}")
    eventually(lambda: jobs.get_job_status(doomed["job_id"]).is_terminal(),
               "the cancelled job's Ray job ended", timeout_s=60)
    again = client.get(doomed["status_url"]).json()
    assert again["state"] == "cancelled" and again["error"]["code"] == "cancelled"
    assert again["files"]["done"] < 24


def test_keys_see_only_their_own_jobs_and_an_audio_quota_stops_a_job(keyed, folder,
                                                                      tmp_path):
    many = _copies(_audio(folder)[0], tmp_path / "quota", 40)
    own = {"Authorization": f"Bearer {keyed.keys['jobber']}"}
    other = {"Authorization": f"Bearer {keyed.keys['alpha']}"}
    with httpx.Client(base_url=keyed.url, timeout=60) as client:
        accepted = submit(client, own, inputs=[str(many)])
        job_id = accepted["job_id"]
        for method, path in (("GET", f"/v1/jobs/{job_id}"), ("DELETE", f"/v1/jobs/{job_id}"),
                             ("GET", f"/v1/jobs/{job_id}/results")):
            refused = client.request(method, path, headers=other)
            assert (refused.status_code, refused.json()["error"]["code"]) == (
                404, "unknown_job"), refused.text
        assert client.get("/v1/jobs", headers=other).json()["jobs"] == []
        job = wait_job(client, job_id, own)
        assert (job["state"], job["error"]["code"]) == ("failed", "quota_exceeded"), \
            f"{job}\n{driver_log(job_id)}"
        assert 0 < job["files"]["done"] < 40, job
        rows = all_rows(client, job_id, own)
        assert len(rows) == job["files"]["done"] and all(r["status"] == "ok" for r in rows)
        # The job's spending reached the Router replicas: the key is refused a new job.
        eventually(lambda: client.post("/v1/jobs", json={"inputs": [str(many)]},
                                       headers=own).status_code == 429,
                   "the spent key refused with 429", timeout_s=30)


def test_refusals_at_submission(service, client, folder, tmp_path):
    outside = client.post("/v1/jobs", json={"inputs": ["/etc/passwd"]})
    assert (outside.status_code, outside.json()["error"]["code"]) == (403, "input_not_allowed")
    sneaky = client.post("/v1/jobs", json={"inputs": [f"{folder}/../../../../etc"]})
    assert sneaky.status_code == 403, sneaky.text
    hook = client.post("/v1/jobs", json={"inputs": [str(folder)],
                                         "callback_url": "http://169.254.169.254/latest"})
    assert (hook.status_code, hook.json()["error"]["code"]) == (422, "invalid_callback")
    weighted = client.post("/v1/jobs", json={"inputs": [str(folder)], "model_version": "nope"})
    assert weighted.status_code == 400, weighted.text
    neither = client.post("/v1/jobs", json={})
    assert neither.status_code == 422, neither.text
    bad = io.BytesIO()
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("../../escape.wav", b"RIFF" + bytes(64))
    escaped = client.post("/v1/jobs", files={"archive": ("bad.zip", bad.getvalue())})
    assert (escaped.status_code, escaped.json()["error"]["code"]) == (422, "invalid_archive")
    assert client.get("/v1/jobs/job-00000000000000000000").status_code == 404
    assert client.get("/v1/jobs/../../etc").status_code == 404
