"""The jobs routes in this process (no cluster): every refusal at submission happens before
anything is stored or submitted; a job's status and results are answered from its folder (the
rows paged as JSON Lines, or as Parquet parts); the allow-list of inputs; the state a job shows
when its driver is gone. The jobs themselves run on the session's cluster
(tests/test_jobs_service.py)."""

from __future__ import annotations

import datetime
import io
import json
import os
import tarfile
import time
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from serve_app.config import RouterSettings
from serve_app.jobs.inputs import allowed, list_inputs
from serve_app.jobs.store import JobStore, new_job_id
from serve_app.jobs.view import job_view, page_of
from serve_app.tools.batch.parts import PartWriter
from tests import inprocess


@pytest.fixture(scope="module")
def readable(tmp_path_factory):
    root = tmp_path_factory.mktemp("readable")
    (root / "a.wav").write_bytes(b"RIFF")
    return root


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def client(tmp_path_factory, readable, jobs_dir):
    settings = RouterSettings(
        default_version="base", decode_workers=0, jobs_dir=str(jobs_dir),
        aliases={"split": {"base": 1, "large": 1}},
        jobs={"allow_inputs": [str(readable)], "callback_hosts": ["hooks.example.org"],
              "max_archive_entries": 1000, "max_unpacked_bytes": 10 * 2**20})
    checkpoint = inprocess.tiny_checkpoint(tmp_path_factory.mktemp("checkpoint"))
    with inprocess.local_service(checkpoint, settings, ("base", "large")) as (_, app), \
            TestClient(app) as http:
        yield http


def _code(response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def _nothing_stored(jobs_dir) -> bool:
    return not any(jobs_dir.rglob("job.json"))


def test_inputs_outside_the_allow_list_are_403(client, readable, tmp_path, jobs_dir):
    link = readable / "escape"
    if not link.exists():
        os.symlink("/etc", link)
    for inputs in (["/etc/passwd"], [f"{readable}/../../etc"], [str(link)],
                   [f"{readable}2"], ["s3://bucket/calls/"], ["file:///etc/hosts"]):
        response = client.post("/v1/jobs", json={"inputs": inputs})
        assert _code(response) == (403, "input_not_allowed"), (inputs, response.text)
    assert _nothing_stored(jobs_dir)


@pytest.mark.parametrize("body, code", [
    ({}, "invalid_request"),
    ({"inputs": []}, "invalid_request"),
    ({"inputs": "not a list"}, "invalid_request"),
    ({"inputs": ["x"], "unknown": 1}, "invalid_request"),
    ({"inputs": ["\x00"]}, "invalid_input"),
    ({"model_version": "split"}, "weighted_alias"),
    ({"metadata": {"big": "x" * 20_000}}, "invalid_request"),
    ({"callback_url": "https://elsewhere.example.com/hook"}, "invalid_callback"),
    ({"callback_url": "http://169.254.169.254/latest/meta-data"}, "invalid_callback"),
    ({"callback_url": "ftp://hooks.example.org/x"}, "invalid_callback"),
])
def test_bad_requests_are_422_and_store_nothing(client, readable, jobs_dir, body, code):
    body = {"inputs": [str(readable)], **body} if "inputs" not in body and body else body
    response = client.post("/v1/jobs", json=body)
    assert _code(response) == (422, code), response.text
    assert _nothing_stored(jobs_dir)


def test_a_callback_needs_a_secret_and_a_model_must_exist(client, readable, jobs_dir):
    # hooks.example.org is allowed, but this open service has no callback secret.
    response = client.post("/v1/jobs", json={"inputs": [str(readable)],
                                             "callback_url": "https://hooks.example.org/h"})
    assert _code(response)[1] == "invalid_callback" and "secret" in response.text
    assert client.post("/v1/jobs", json={"inputs": [str(readable)],
                                         "model_version": "nope"}).status_code == 400
    assert client.post("/v1/jobs", content=b"x", headers={
        "content-type": "text/plain"}).status_code == 415
    for body in (b"\x80\x81 not UTF-8", b"{\"inputs\": [\"\xff\"]}", b"[1, 2", b"[" * 50_000):
        response = client.post("/v1/jobs", content=body,
                               headers={"content-type": "application/json"})
        assert _code(response) == (422, "invalid_request"), (body, response.text)
    assert _nothing_stored(jobs_dir)


def _zip(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            archive.writestr(info, "/etc/passwd")
    return data.getvalue()


def _tar_with_link() -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as archive:
        info = tarfile.TarInfo("calls/link.wav")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(info)
    return data.getvalue()


@pytest.mark.parametrize("name, archive", [
    ("escape", lambda: _zip({"../../escape.wav": b"RIFF"})),
    ("absolute", lambda: _zip({"/tmp/abs.wav": b"RIFF"})),
    ("zip link", lambda: _zip({"a.wav": b"RIFF"}, symlink="b.wav")),
    ("tar link", _tar_with_link),
    ("entries", lambda: _zip({f"{i}.wav": b"" for i in range(1001)})),
    ("bomb", lambda: _zip({"zeros.wav": bytes(40 * 2**20)})),
    ("not an archive", lambda: b"RIFF" + bytes(100)),
])
def test_bad_archives_are_422_invalid_archive_and_store_nothing(client, jobs_dir, name,
                                                                 archive):
    response = client.post("/v1/jobs", files={"archive": ("calls.zip", archive())},
                           data={"model_version": "base"})
    assert _code(response) == (422, "invalid_archive"), (name, response.text)
    assert _nothing_stored(jobs_dir)


def test_an_archive_and_inputs_together_are_refused(client, readable):
    response = client.post("/v1/jobs", files={"archive": ("a.zip", _zip({"a.wav": b"x"}))},
                           data={"inputs": json.dumps([str(readable)])})
    assert _code(response) == (422, "invalid_request")


def _finished_job(store: JobStore, owner: str, rows: int, part_rows: int) -> str:
    job_id = new_job_id()
    record = {"job_id": job_id, "variant": "base", "created": "2026-12-07T00:00:00+00:00",
              "status_url": f"http://x/v1/jobs/{job_id}",
              "results_url": f"http://x/v1/jobs/{job_id}/results", "head": None}
    store.create(owner, job_id, record)
    writer = PartWriter(store.local_folder(owner, job_id) / "results", part_rows, 3600)
    writer.add(pa.table({"path": [f"clip-{i:03d}.wav" for i in range(rows)],
                         "confidence": [i / rows for i in range(rows)]}))
    writer.close()
    store.write_status(owner, job_id, {"state": "succeeded", "files": {
        "total": rows, "done": rows, "failed": 0}, "rows": rows})
    return job_id


def test_results_are_paged_and_served_as_parquet_parts(client, jobs_dir):
    job_id = _finished_job(JobStore(str(jobs_dir)), "anonymous", rows=23, part_rows=5)
    status = client.get(f"/v1/jobs/{job_id}").json()
    assert (status["state"], status["files"]["done"]) == ("succeeded", 23)
    seen, offset = [], 0
    for _ in range(10):
        page = client.get(f"/v1/jobs/{job_id}/results", params={"offset": offset, "limit": 4})
        seen += [json.loads(line)["path"] for line in page.text.splitlines()]
        if "x-next-offset" not in page.headers:
            break
        offset = int(page.headers["x-next-offset"])
    assert seen == [f"clip-{i:03d}.wav" for i in range(23)]
    parts = client.get(f"/v1/jobs/{job_id}/results", params={"format": "parquet"}).json()
    assert len(parts["parts"]) == 5
    tables = [pq.read_table(io.BytesIO(client.get(part["url"]).content))
              for part in parts["parts"]]
    assert sum(table.num_rows for table in tables) == 23
    for bad in ({"format": "xml"}, {"offset": "-1"}, {"limit": "10000000"}):
        assert client.get(f"/v1/jobs/{job_id}/results", params=bad).status_code == 422
    assert client.get(f"/v1/jobs/{job_id}/results", params={
        "format": "parquet", "part": "../job.json"}).status_code == 404
    # Another owner's folder is not this caller's: unknown.
    other = _finished_job(JobStore(str(jobs_dir)), "someone-else", rows=2, part_rows=5)
    assert _code(client.get(f"/v1/jobs/{other}")) == (404, "unknown_job")
    assert other not in [job["job_id"] for job in client.get("/v1/jobs").json()["jobs"]]


def test_page_of_reads_each_part_once():
    sizes = [("a", 3), ("b", 4), ("c", 2)]
    assert page_of(sizes, 0, 2) == [("a", 0, 2)]
    assert page_of(sizes, 2, 3) == [("a", 2, 1), ("b", 0, 2)]
    assert page_of(sizes, 8, 5) == [("c", 1, 1)]
    assert page_of(sizes, 9, 5) == []


def test_a_job_whose_driver_is_gone_says_so():
    record = {"job_id": "job-1", "variant": "base", "created": "t", "status_url": "s",
              "results_url": "r", "head": None}
    running = {"state": "running", "files": {"total": 4, "done": 1, "failed": 0}}
    assert job_view(record, None, None)["state"] == "queued"
    assert job_view(record, running, ("RUNNING", ""))["state"] == "running"
    lost = job_view(record, running, ("FAILED", "killed"))
    assert (lost["state"], lost["error"]["code"]) == ("failed", "job_lost")
    assert job_view(record, None, ("STOPPED", ""))["state"] == "cancelled"
    assert job_view(record, running, ("FAILED", ""), cancel_requested=True)["state"] == \
        "cancelled"
    done = {**running, "state": "succeeded"}
    assert job_view(record, done, ("FAILED", "later"))["state"] == "succeeded"


def test_the_allow_list_compares_whole_path_components(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data2").mkdir()
    (tmp_path / "data" / "a.wav").write_bytes(b"x")
    (tmp_path / "data2" / "b.wav").write_bytes(b"x")
    os.symlink(tmp_path / "data2" / "b.wav", tmp_path / "data" / "link.wav")
    allow = [str(tmp_path / "data")]
    assert allowed(str(tmp_path / "data" / "a.wav"), allow)
    assert allowed((tmp_path / "data").as_uri(), allow)
    assert not allowed(str(tmp_path / "data2" / "b.wav"), allow)
    assert not allowed(str(tmp_path / "data" / ".." / "data2"), allow)
    assert allowed("s3://bucket/calls/x.wav", ["s3://bucket/calls"])
    assert not allowed("s3://bucket/calls2/x.wav", ["s3://bucket/calls"])
    assert not allowed("s3://bucket/calls/../secret/x.wav", ["s3://bucket/calls"])
    assert not allowed("gs://bucket/calls/x.wav", ["s3://bucket/calls"])
    files, refused = list_inputs([str(tmp_path / "data")], allow, {".wav"})
    assert files == [str((tmp_path / "data" / "a.wav").resolve())]
    assert refused == [str((tmp_path / "data2" / "b.wav").resolve())]  # through the link


def test_the_retention_sweep_deletes_only_jobs_that_ended_long_enough_ago(tmp_path):
    store = JobStore(str(tmp_path))
    old = _finished_job(store, "alpha", rows=1, part_rows=5)
    fresh = _finished_job(store, "beta", rows=1, part_rows=5)
    running = _finished_job(store, "beta", rows=1, part_rows=5)
    for owner, job_id, state, finished in (
            ("alpha", old, "succeeded", "2026-11-01T00:00:00.000+00:00"),
            ("beta", fresh, "failed", "2026-12-06T23:00:00.000+00:00"),
            ("beta", running, "running", None)):
        store.write_status(owner, job_id, {"state": state, "finished": finished})
    now = datetime.datetime(2026, 12, 7, tzinfo=datetime.UTC).timestamp()
    assert store.sweep(7 * 86_400, now) == [old]
    assert store.job_ids("alpha") == [] and store.job_ids("beta") == sorted([fresh, running])


def test_job_ids_sort_as_jobs_were_made_and_a_bad_callback_host_is_a_config_error():
    first = new_job_id()
    time.sleep(1.05)
    assert sorted([new_job_id(), first])[0] == first
    with pytest.raises(ValidationError):
        RouterSettings(jobs={"callback_hosts": ["http://not a host/"]})
