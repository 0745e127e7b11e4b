"""Jobs over HTTP in the tests: submit, wait, read every row, and a callback receiver on
127.0.0.1 that answers as scripted and keeps what it was sent."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler

import httpx

from tests.local_http import LocalServer

JOB_TIMEOUT_S = 300.0  # a job starts a driver and an engine: a busy 2-core machine is slow
ENDED = ("succeeded", "failed", "cancelled")


def submit(client: httpx.Client, headers: dict | None = None, **fields) -> dict:
    response = client.post("/v1/jobs", json=fields, headers=headers or {})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] == "queued" and body["status_url"].endswith(body["job_id"])
    return body


def wait_job(client: httpx.Client, job_id: str, headers: dict | None = None,
             until=ENDED, timeout_s: float = JOB_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(f"/v1/jobs/{job_id}", headers=headers or {})
        assert response.status_code == 200, response.text
        job = response.json()
        if job["state"] in until:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']}: {job}\n" \
            f"its driver's log ends:\n{driver_log(job_id)}"
        time.sleep(0.5)


def driver_log(job_id: str) -> str:
    """The end of a job's driver log (Ray's job server keeps it), for a failing test."""
    from ray._private.services import get_webui_url_from_internal_kv
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(f"http://{get_webui_url_from_internal_kv()}")
        return client.get_job_logs(job_id)[-4000:]
    except Exception as exc:  # the log is a help, not the test
        return f"(no log: {exc!r})"


def all_rows(client: httpx.Client, job_id: str, headers: dict | None = None,
             limit: int = 7) -> list[dict]:
    """Every row, page by page (small pages: the paging is what is read)."""
    rows, offset = [], 0
    for _ in range(10_000):
        response = client.get(f"/v1/jobs/{job_id}/results", headers=headers or {},
                              params={"offset": offset, "limit": limit})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/x-ndjson")
        page = [json.loads(line) for line in response.text.splitlines()]
        assert len(page) <= limit
        rows.extend(page)
        following = response.headers.get("x-next-offset")
        if following is None:
            return rows
        assert int(following) == offset + len(page)
        offset = int(following)
    raise AssertionError("results never ended")


class CallbackReceiver(LocalServer):
    """Answers each POST with the next of `statuses` (then 200); `hang` answers nothing for
    that many seconds first. Every request is kept (headers, body)."""

    def __init__(self, statuses: list[int] = (), hang_s: float = 0.0):
        self.received: list[tuple[dict, bytes]] = []
        self.errors: list[BaseException] = []
        script, lock = list(statuses), threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                try:
                    body = self.rfile.read(int(self.headers.get("content-length", 0)))
                    with lock:
                        receiver.received.append((dict(self.headers), body))
                        status = script.pop(0) if script else 200
                    if hang_s:
                        time.sleep(hang_s)
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender gave up waiting: what a hanging receiver causes
                except BaseException as exc:  # fails the test that reads .errors
                    receiver.errors.append(exc)

            def log_message(self, *args):
                pass

        super().__init__(Handler)
        self.hook = f"{self.url}/hooks/e2v"
