"""A job's driver: `python -m serve_app.jobs.driver --jobs-dir D --owner O --job ID`, the
entrypoint of the Ray Job that the Router submits for POST /v1/jobs (docs/jobs.md).

It reads the job's record from jobs_dir, lists its inputs (or unpacks its uploaded archive into
the job's folder, where every node sees it), and runs the batch job's own Ray Data pipeline
(serve_app/tools/batch) with the model the variant deployment serves, writing Parquet parts into
the job's folder and its progress into status.json. It charges the key's audio quota as it
scores, through the board the Router replicas share (serve_app/api/quota_board.py), and stops
with quota_exceeded when the key runs out; a DELETE (the `cancel` mark) or Ray's stop_job
(SIGTERM) stops it as cancelled. When it ends it posts the signed summary to the callback URL,
retrying, every attempt recorded in the status. The Router only admits, tracks and answers:
a job goes on when Router replicas come and go.
"""

from __future__ import annotations

import _thread
import argparse
import json
import logging
import signal
import sys
import threading
import time

from serve_app.jobs.run import Stop, run_job
from serve_app.jobs.store import JobStore
from serve_app.jobs.view import iso_now

logger = logging.getLogger("emotion2vec.jobs")
CANCEL_POLL_S = 1.0
STATUS_EVERY_S = 1.0
SUMMARY_FIELDS = ("job_id", "state", "files", "audio_s", "rows", "error", "created", "started",
                  "finished", "model_version", "head", "metadata", "status_url", "results_url")


class Progress:
    """The job's status.json, kept and written by the driver."""

    def __init__(self, store: JobStore, owner: str, job_id: str):
        self.store, self.owner, self.job_id = store, owner, job_id
        self.status: dict = {"state": "running", "started": iso_now(), "finished": None,
                             "files": {"total": 0, "done": 0, "failed": 0}, "audio_s": 0.0,
                             "rows": 0, "parts": 0, "eta_s": None, "error": None,
                             "callback": None}
        self._clock = time.monotonic()
        self._written = 0.0

    def save(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._written >= STATUS_EVERY_S:
            self._written = now
            self.store.write_status(self.owner, self.job_id, self.status)

    def scored(self, tally, parts: int, total: int) -> None:
        done = sum(tally.statuses.values())
        elapsed = time.monotonic() - self._clock
        self.status.update(files={"total": total, "done": done,
                                  "failed": tally.statuses.get("failed", 0)},
                           audio_s=round(tally.audio_s, 3), rows=tally.rows, parts=parts,
                           eta_s=round((total - done) * elapsed / done, 1) if done else None)
        self.save()

    def end(self, state: str, error: dict | None = None) -> None:
        self.status.update(state=state, finished=iso_now(), eta_s=None if state != "succeeded"
                           else 0.0, error=error)
        self.save(force=True)


def _watch_cancel(store: JobStore, owner: str, job_id: str, done: threading.Event) -> None:
    """Interrupt the main thread (KeyboardInterrupt) once DELETE marked the job."""
    while not done.wait(CANCEL_POLL_S):
        try:
            if store.cancel_requested(owner, job_id) and not done.is_set():
                _thread.interrupt_main()
                return
        except OSError:
            continue  # jobs_dir unreachable a moment: look again


def _on_sigterm(signum, frame):  # Ray's stop_job: the same path as DELETE
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.jobs.driver")
    parser.add_argument("--jobs-dir", required=True)
    parser.add_argument("--owner", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--address", default="auto", help="the cluster's GCS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    store = JobStore(args.jobs_dir)
    record = store.record(args.owner, args.job)
    progress = Progress(store, args.owner, args.job)
    progress.save(force=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, _on_sigterm)
    threading.Thread(target=_watch_cancel, args=(store, args.owner, args.job, done),
                     daemon=True).start()
    try:
        if store.cancel_requested(args.owner, args.job):
            raise KeyboardInterrupt
        run_job(store, args.owner, args.job, record, progress, args.address)
        progress.end("succeeded")
    except KeyboardInterrupt:
        progress.end("cancelled", {"code": "cancelled", "message": "the job was cancelled"})
    except Stop as exc:
        progress.end("failed", {"code": exc.code, "message": exc.message})
    except Exception as exc:  # whatever stopped it is the job's error, said in its status
        logger.exception("job %s failed", args.job)
        progress.end("failed", {"code": "job_failed", "message": _reason(exc)})
    finally:
        done.set()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _call_back(record, progress)
    return 0 if progress.status["state"] == "succeeded" else 1


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:2000]


def summary(record: dict, status: dict) -> dict:
    """What a callback posts (and GET /v1/jobs/{id} answers, with more)."""
    from serve_app.jobs.view import job_view

    view = job_view(record, status, None)
    return {name: view.get(name) for name in SUMMARY_FIELDS}


def _call_back(record: dict, progress: Progress) -> None:
    """POST the signed summary to the callback URL, retrying; each attempt recorded."""
    callback = record.get("callback")
    if not callback:
        return
    from serve_app.jobs import callbacks

    deliveries: list[dict] = []
    progress.status["callback"] = {"url": callback["url"], "delivered": False,
                                   "attempts": deliveries}
    progress.save(force=True)
    body = json.dumps(summary(record, progress.status)).encode()

    def recorded(attempt) -> None:
        deliveries.append(attempt.to_dict())
        progress.save(force=True)

    try:
        delivered = callbacks.deliver(
            callback["url"], body, callback["secret"], allowed_hosts=callback["hosts"],
            attempts=callback["attempts"], timeout_s=callback["timeout_s"],
            backoff_s=callback["backoff_s"], on_attempt=recorded)
    except Exception as exc:  # a refused URL (DNS changed since submission), say so
        deliveries.append({"at": iso_now(), "status": None, "error": _reason(exc),
                           "duration_ms": 0.0})
        delivered = False
    progress.status["callback"]["delivered"] = delivered
    progress.save(force=True)


if __name__ == "__main__":
    sys.exit(main())
