"""Admitting a job (POST /v1/jobs): the request read (JSON, or multipart with an archive), every
check done before anything is stored (inputs in the allow-list, one model and one head, labels,
the callback URL, the archive's listing, the bounds on jobs in flight, the key's audio
balance), then the job's record written to jobs_dir and its Ray Job submitted."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from fastapi import Request
from pydantic import Field, ValidationError
from starlette.datastructures import UploadFile

from serve_app.api import protocol, upload
from serve_app.api.pipeline import Call
from serve_app.config import without_inputs
from serve_app.errors import ApiError
from serve_app.jobs.archive import InvalidArchive, inspect
from serve_app.jobs.callbacks import InvalidCallback, check_callback_url
from serve_app.jobs.inputs import check_inputs
from serve_app.jobs.store import JobStore, new_job_id
from serve_app.jobs.unpack import limits_of
from serve_app.jobs.view import ENDED, iso_now
from serve_app.labels import parse_label_set
from serve_app.traffic.access import callback_secret, presented_key
from serve_app.untrusted import load_json

ARCHIVE_FIELD = "archive"
MAX_JSON_BYTES = 1024 * 1024
MAX_METADATA_BYTES = 16 * 1024
RETRY_S = "30"  # a job in flight takes minutes: try again later rather than at once
RAY_TIMEOUT_S = 30.0  # one call to the job server (the first imports its client)
logger = logging.getLogger("ray.serve")


class JobRequest(protocol.Closed):
    inputs: list[str] = Field(default_factory=list, description="files, folders or URIs "
                              "(s3://, gs://, file://) the cluster reads, within "
                              "jobs.allow_inputs; or none, with an uploaded archive")
    model_version: str | None = Field(None, description="a variant or a plain alias (not a "
                                      "weighted one: a job scores with one model)")
    head: str | None = Field(None, description="a custom head: NAME, NAME@REV or a plain "
                             "head alias")
    by_segment: bool = Field(False, description="one row per speech segment")
    embeddings: bool = Field(False, description="add the embedding column")
    labels: list[str] | str | None = Field(None, description="a label set")
    callback_url: str | None = Field(None, description="POSTed a signed summary when the job "
                                     "ends (a host in jobs.callback_hosts)")
    metadata: dict | None = Field(None, description="yours, returned as given (16 KiB)")


def _invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


async def _read_json(request: Request) -> JobRequest:
    data = await upload.read_capped(request, MAX_JSON_BYTES)
    try:
        return JobRequest.model_validate(load_json(data))
    except ValidationError as exc:
        raise _invalid(without_inputs(exc)) from None
    except ValueError as exc:  # not UTF-8, not JSON, nested too deep (untrusted.load_json)
        raise _invalid(f"the body is not JSON: {exc}") from None


def _copy_archive(part: UploadFile, limit: int) -> Path:
    """The uploaded archive, spooled by Starlette, copied to a file of its own (its listing
    is read from there, then it moves into the job's folder)."""
    descriptor, name = tempfile.mkstemp(prefix="e2v-upload-")
    try:
        with open(descriptor, "wb") as handle:
            part.file.seek(0)
            shutil.copyfileobj(part.file, handle, 1024 * 1024)
        if os.path.getsize(name) > limit:
            raise upload.upload_too_large(limit, "the archive")
        return Path(name)
    except BaseException:
        os.unlink(name)
        raise


async def _read_form(request: Request, limit: int) -> tuple[JobRequest, Path | None]:
    names = tuple(JobRequest.model_fields)
    form = await upload.read_form(
        request, upload.capped_receive(request, limit + upload.FORM_OVERHEAD),
        (ARCHIVE_FIELD, *names), max_files=1, max_part_size=upload.FORM_OVERHEAD)
    values: dict = {}
    for name, value in form.items():
        if name == ARCHIVE_FIELD or not isinstance(value, str):
            continue
        if name in ("inputs", "metadata") or (name == "labels" and value.startswith("[")):
            try:
                values[name] = load_json(value)
            except ValueError:
                raise _invalid(f"{name} must be JSON") from None
        elif name in ("by_segment", "embeddings"):
            values[name] = upload.parse_bool(name, value)
        else:
            values[name] = value
    try:
        job = JobRequest.model_validate(values)
    except ValidationError as exc:
        raise _invalid(without_inputs(exc)) from None
    part = form.get(ARCHIVE_FIELD)
    if part is not None and not isinstance(part, UploadFile):
        raise ApiError(422, "invalid_parameter", f"{ARCHIVE_FIELD} must be a file")
    archive = await asyncio.to_thread(_copy_archive, part, limit) if part else None
    return job, archive


async def read_job_request(request: Request, limit: int) -> tuple[JobRequest, Path | None]:
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        return await _read_form(request, limit)
    if kind.startswith("application/json") or not kind:
        return await _read_json(request), None
    raise ApiError(415, "unsupported_media_type", "send the job as application/json, or as "
                   f"multipart/form-data with the archive in {ARCHIVE_FIELD!r}")


def _one_model(requested: str | None, aliases: dict, what: str) -> str | None:
    name = (requested or "").strip() or None
    if name is not None and isinstance(aliases.get(name), dict):
        raise ApiError(422, "weighted_alias", f"{what} {name!r} splits requests between "
                       f"{sorted(aliases[name])} by weight; a job scores every file with one: "
                       "name one of them")
    return name


def _callback(call: Call, request: Request, url: str) -> dict:
    jobs = call.settings.jobs
    key = presented_key(request.headers, None) if call.admission.key_id else None
    secret = (callback_secret(key) if key else None) or jobs.callback_secret
    if secret is None:
        raise InvalidCallback("callbacks need a signing secret: set jobs.callback_secret "
                              "(or use API keys: each key signs its own)").api_error()
    try:
        check_callback_url(url, jobs.callback_hosts)
    except InvalidCallback as exc:
        raise exc.api_error() from None
    return {"url": url, "secret": secret, "hosts": jobs.callback_hosts,
            "attempts": jobs.callback_attempts, "timeout_s": jobs.callback_timeout_s,
            "backoff_s": jobs.callback_backoff_s}


def _router_settings(call: Call) -> dict:
    """The Router's settings as the driver needs them: limits, jobs, heads, and the job's key
    alone (its quotas)."""
    key_id = call.admission.key_id
    spec = call.pipeline.access.spec(key_id)
    return call.settings.model_copy(update={
        "api_keys": {key_id: spec} if spec else {}, "api_keys_file": None}).model_dump(
            mode="json")


def _app_name() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().app_name
    except Exception:  # outside a replica (an in-process app): no jobs run there anyway
        return "default"


async def admit_job(call: Call, request: Request, ray_jobs, owner: str) -> dict:
    """Check, record and submit a job; the 202 answer."""
    settings, pipeline = call.settings, call.pipeline
    jobs = settings.jobs
    job, archive = await read_job_request(request, jobs.max_archive_bytes)
    try:
        if bool(job.inputs) == bool(archive):
            raise _invalid("give `inputs` (files, folders, URIs) or upload one archive in "
                           f"{ARCHIVE_FIELD!r}, not both and not neither")
        if len(job.inputs) > jobs.max_inputs:
            raise _invalid(f"at most {jobs.max_inputs} inputs; name their folders instead")
        check_inputs(job.inputs, jobs.allow_inputs)
        route = pipeline.resolve(_one_model(job.model_version, settings.aliases,
                                            "model_version"))
        head = None
        if job.head:
            name = _one_model(job.head, settings.heads.aliases, "head")
            head = await pipeline.head(settings.heads.aliases.get(name, name))
        labels = parse_label_set(job.labels)
        await pipeline.check_labels(route.variant, labels, head)
        callback = await asyncio.to_thread(_callback, call, request, job.callback_url) \
            if job.callback_url else None
        if job.metadata is not None and len(json.dumps(job.metadata)) > MAX_METADATA_BYTES:
            raise _invalid(f"metadata is larger than {MAX_METADATA_BYTES} bytes as JSON")
        kind = None
        if archive is not None:
            try:
                kind = (await asyncio.to_thread(inspect, archive, limits_of(jobs))).kind
            except InvalidArchive as exc:
                raise exc.api_error() from None
        # The model the variant serves now: the job's engines load the same.
        model = await pipeline.variants.settings(route.variant)
        store = JobStore(settings.jobs_dir)
        counts = await jobs_io(_in_flight, store, ray_jobs, timeout_s=60.0)
        if counts[owner] >= jobs.max_jobs_per_key:
            raise ApiError(429, "too_many_jobs", f"{counts[owner]} jobs of this key are queued "
                           f"or running (at most {jobs.max_jobs_per_key}); wait for one to end",
                           headers={"Retry-After": RETRY_S})
        if sum(counts.values()) >= jobs.max_jobs:
            raise ApiError(503, "jobs_busy", f"{jobs.max_jobs} jobs are queued or running; "
                           "try again later", headers={"Retry-After": RETRY_S})
        job_id = new_job_id()
        base = str(request.base_url).rstrip("/")
        record = {
            "job_id": job_id, "owner": owner, "key_id": call.admission.key_id,
            "app": _app_name(), "created": iso_now(), "variant": route.variant, "model": model,
            "head": dataclasses.asdict(head) if head else None,
            "labels": list(labels) if labels else None, "inputs": job.inputs,
            "archive": f"upload.{kind}" if kind else None, "by_segment": job.by_segment,
            "embeddings": job.embeddings, "metadata": job.metadata, "callback": callback,
            "router": _router_settings(call),
            "status_url": f"{base}/v1/jobs/{job_id}",
            "results_url": f"{base}/v1/jobs/{job_id}/results"}
        await jobs_io(_store_job, store, owner, job_id, record, archive, timeout_s=600.0)
        try:
            await jobs_io(ray_jobs.submit, job_id, settings.jobs_dir, owner, record["app"])
        except ApiError:
            await asyncio.to_thread(store.delete, owner, job_id)
            raise
    finally:
        if archive is not None:
            archive.unlink(missing_ok=True)
    return {"job_id": job_id, "state": "queued", "status_url": record["status_url"],
            "results_url": record["results_url"]}


async def jobs_io(function, *args, timeout_s: float = RAY_TIMEOUT_S):
    """A call to jobs_dir or the job server, in a thread: 503 jobs_unavailable while either
    cannot be reached (ApiErrors, such as 404, pass)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(function, *args), timeout_s)
    except ApiError:
        raise
    except Exception as exc:  # the job server or the storage, in any of their ways
        logger.warning("jobs: %s failed: %r", getattr(function, "__name__", function), exc)
        raise ApiError(503, "jobs_unavailable", f"the jobs service cannot answer now: "
                       f"{str(exc)[:300] or type(exc).__name__}",
                       headers={"Retry-After": "5"}) from None


def _in_flight(store: JobStore, ray_jobs) -> Counter:
    """Jobs queued or running, by owner: Ray's drivers still there whose jobs have not ended
    (a driver posting its callback has ended its job)."""
    counts: Counter = Counter()
    for owner, job_id in ray_jobs.in_flight(_app_name()):
        try:
            status = store.status(owner, job_id) or {}
        except ApiError:  # not a job id of ours
            continue
        if status.get("state") not in ENDED:
            counts[owner] += 1
    return counts


def _store_job(store: JobStore, owner: str, job_id: str, record: dict,
               archive: Path | None) -> None:
    if archive is not None:
        with store.open_archive_writer(owner, job_id, record["archive"]) as out, \
                open(archive, "rb") as source:
            shutil.copyfileobj(source, out, 1024 * 1024)
    store.create(owner, job_id, record)
