"""The jobs API (docs/jobs.md): `POST /v1/jobs` admits a job over files the cluster reads or an
uploaded archive and submits it as a Ray Job (serve_app/jobs/driver.py runs it); `GET
/v1/jobs`, `GET /v1/jobs/{id}`, `DELETE /v1/jobs/{id}` and `GET /v1/jobs/{id}/results` answer
from the job's folder in jobs_dir (serve_app/jobs/store.py) and Ray's word on the driver. A job
belongs to the key that made it: another key's job is 404. Every call is admitted and logged by
the request pipeline. No torch: the Router only admits, tracks and answers.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serve_app.api import protocol
from serve_app.api.app import Parts
from serve_app.api.jobs_admit import JobRequest, admit_job, jobs_io
from serve_app.api.pipeline import Call
from serve_app.errors import ApiError
from serve_app.jobs.ray_jobs import RayJobs
from serve_app.jobs.store import ANONYMOUS_OWNER, JobStore
from serve_app.jobs.view import ENDED, job_view, page_of
from serve_app.untrusted import whole_number

router = APIRouter()
logger = logging.getLogger("ray.serve")

CANCEL_WAIT_S = 10.0     # DELETE waits this long for the driver to say it stopped
SWEEP_EVERY_S = 3600.0   # how often a replica deletes the jobs past their retention
PARQUET = "application/vnd.apache.parquet"


class JobAccepted(protocol.Closed):
    job_id: str
    state: str
    status_url: str
    results_url: str


class JobStatusBody(protocol.Open):
    """The job: state (queued, running, succeeded, failed, cancelled), files total / done /
    failed, audio seconds scored, times, the estimate of the time left, the error, the
    callback's delivery attempts."""

    job_id: str
    state: str
    files: dict
    audio_s: float


class JobsList(protocol.Closed):
    jobs: list[JobStatusBody]


def owner_of(call: Call) -> str:
    return call.admission.key_id or ANONYMOUS_OWNER


def store_of(call: Call) -> JobStore:
    return JobStore(call.settings.jobs_dir)


def ray_jobs(call: Call, parts) -> RayJobs:
    """The cluster's job server, where the Router's settings say it is."""
    parts.jobs.dashboard_url = call.settings.jobs.dashboard_url
    return parts.jobs


_sweeps: dict[str, float] = {}  # jobs_dir -> when this replica last swept it
_sweeping: set[asyncio.Task] = set()


def _sweep_now_and_then(store: JobStore, retention_days: float) -> None:
    """At most once in SWEEP_EVERY_S per replica, delete the jobs that ended longer than
    retention_days ago, in the background (a submission never waits on it)."""
    now = time.monotonic()
    if now - _sweeps.get(store.location, -SWEEP_EVERY_S) < SWEEP_EVERY_S:
        return
    _sweeps[store.location] = now

    async def sweep() -> None:
        try:
            deleted = await asyncio.to_thread(store.sweep, retention_days * 86_400)
            if deleted:
                logger.info("jobs: deleted %d jobs older than %g days", len(deleted),
                            retention_days)
        except Exception as exc:  # the next sweep tries again
            logger.warning("jobs: the retention sweep of %s failed: %r", store.location, exc)

    task = asyncio.get_running_loop().create_task(sweep())
    _sweeping.add(task)
    task.add_done_callback(_sweeping.discard)


def _view(store: JobStore, ray_jobs, owner: str, job_id: str) -> dict:
    record = store.record(owner, job_id)
    status = store.status(owner, job_id)
    ended = status is not None and status.get("state") in ENDED
    ray_state = None if ended else ray_jobs.state(job_id)
    return job_view(record, status, ray_state,
                    not ended and store.cancel_requested(owner, job_id))


@router.post("/v1/jobs", summary="Score files or an uploaded archive as a job (202): JSON, or "
             "multipart with the archive in `archive` and the fields beside it",
             status_code=202, response_model=JobAccepted,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": protocol.schema_of(JobRequest)},
                 "multipart/form-data": {"schema": {"type": "object", "properties": {
                     "archive": {"type": "string", "format": "binary",
                                 "description": "a zip or tar (gz, bz2, xz) of audio files"}},
                     "additionalProperties": {"type": "string"}}}}}},
             responses=protocol.errors(400, 401, 403, 404, 409, 413, 422, 429, 503))
async def submit_job(request: Request, parts: Parts) -> JSONResponse:
    async with parts.pipeline.request(request, kind="jobs") as call:
        call.trace["route"] = "jobs"
        accepted = await admit_job(call, request, ray_jobs(call, parts), owner_of(call))
        call.trace["job"] = accepted["job_id"]
        _sweep_now_and_then(store_of(call), call.settings.jobs.retention_days)
        return call.respond(JSONResponse(accepted, status_code=202))


@router.get("/v1/jobs", summary="The key's jobs, newest first", response_model=JobsList,
            responses=protocol.errors(401, 422, 429, 503))
async def list_jobs(request: Request, parts: Parts, limit: int = 100) -> JSONResponse:
    async with parts.pipeline.request(request, kind="jobs", audio=False) as call:
        call.trace["route"] = "jobs"
        store, owner, cluster = store_of(call), owner_of(call), ray_jobs(call, parts)
        limit = max(1, min(limit, 1000))

        def views() -> list[dict]:
            return [_view(store, cluster, owner, job_id)
                    for job_id in reversed(store.job_ids(owner)[-limit:])]

        return call.respond(JSONResponse({"jobs": await jobs_io(views, timeout_s=60.0)}))


@router.get("/v1/jobs/{job_id}", summary="A job's state and progress",
            response_model=JobStatusBody, responses=protocol.errors(401, 404, 429, 503))
async def job_status(job_id: str, request: Request, parts: Parts) -> JSONResponse:
    async with parts.pipeline.request(request, kind="jobs", audio=False) as call:
        call.trace["route"] = "jobs"
        view = await jobs_io(_view, store_of(call), ray_jobs(call, parts), owner_of(call),
                             job_id)
        return call.respond(JSONResponse(view))


@router.delete("/v1/jobs/{job_id}", summary="Cancel a job: its Ray job stops; the rows "
               "written stay readable", response_model=JobStatusBody,
               responses=protocol.errors(401, 404, 429, 503))
async def cancel_job(job_id: str, request: Request, parts: Parts) -> JSONResponse:
    async with parts.pipeline.request(request, kind="jobs", audio=False) as call:
        call.trace["route"] = "jobs"
        store, owner, cluster = store_of(call), owner_of(call), ray_jobs(call, parts)
        view = await jobs_io(_view, store, cluster, owner, job_id)
        if view["state"] not in ENDED:
            await jobs_io(store.request_cancel, owner, job_id)
            if view["state"] == "queued":  # no driver yet to see the mark: Ray stops it
                await jobs_io(cluster.stop, job_id)
            deadline = time.monotonic() + CANCEL_WAIT_S
            while view["state"] not in ENDED and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                view = await jobs_io(_view, store, cluster, owner, job_id)
        return call.respond(JSONResponse(view))


@router.get("/v1/jobs/{job_id}/results", summary="A job's rows (the batch job's schema): JSON "
            "Lines, paged by offset and limit (X-Next-Offset says where the next page starts); "
            "or ?format=parquet: the list of Parquet parts, or one part with &part=NAME. "
            "Readable while the job runs",
            responses={200: {"content": {"application/x-ndjson": {}, PARQUET: {}}},
                       **protocol.errors(401, 404, 422, 429, 503)})
async def job_results(job_id: str, request: Request, parts: Parts, offset: str = "0",
                      limit: str | None = None, format: str = "jsonl",
                      part: str | None = None) -> Response:
    async with parts.pipeline.request(request, kind="jobs", audio=False) as call:
        call.trace["route"] = "jobs"
        store, owner = store_of(call), owner_of(call)
        view = await jobs_io(_view, store, ray_jobs(call, parts), owner, job_id)  # or 404
        if format == "parquet":
            if part is not None:
                data = await jobs_io(store.read_part, owner, job_id, part, timeout_s=120.0)
                return call.respond(Response(data, media_type=PARQUET))
            names = await jobs_io(store.parts, owner, job_id)
            base = str(request.url.remove_query_params(["part", "offset", "limit"]))
            return call.respond(JSONResponse({"parts": [
                {"name": name, "url": f"{base}&part={name}"} for name in names]}))
        if format != "jsonl":
            raise ApiError(422, "invalid_parameter", f"format is jsonl or parquet, not "
                           f"{format[:40]!r}")
        most = call.settings.jobs.max_page_rows
        try:
            start = whole_number(offset, "offset", 2**53)
            count = whole_number(limit, "limit", most) if limit else most
        except ValueError as exc:
            raise ApiError(422, "invalid_parameter", str(exc)) from None
        body, following = await jobs_io(_page, store, owner, job_id, start, max(count, 1),
                                        view["state"] in ENDED, timeout_s=120.0)
        headers = {"X-Next-Offset": str(following)} if following is not None else {}
        return call.respond(Response(body, media_type="application/x-ndjson",
                                     headers=headers))


def _page(store: JobStore, owner: str, job_id: str, start: int, count: int, ended: bool
          ) -> tuple[bytes, int | None]:
    """Rows [start, start + count) as JSON Lines, and where the next page starts (None: no
    row after these yet, and the job has ended)."""
    names = store.parts(owner, job_id)
    sizes = [(name, store.part_rows(owner, job_id, name)) for name in names]
    out = io.StringIO()
    taken = 0
    for name, first, rows in page_of(sizes, start, count):
        for row in store.read_rows(owner, job_id, name, first, rows).to_pylist():
            out.write(json.dumps(row, allow_nan=False, default=str) + "\n")
        taken += rows
    total = sum(rows for _, rows in sizes)
    more = start + taken < total or not ended
    return out.getvalue().encode(), start + taken if more else None
