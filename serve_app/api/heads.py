"""The custom heads' routes (docs/heads.md): list, describe, register and delete heads in the
Router's heads_dir (serve_app/heads/registry.py). Scoring with one is `head=` on the
prediction routes (serve_app/api/pipeline.py). Every call is admitted and logged by the
request pipeline; registering or deleting needs a key with `heads: write` when keys are on.
A head registered or deleted here is seen by every Router replica within heads.refresh_s,
with no redeploy. No torch: a head file is checked with numpy before it is stored.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from serve_app.api import protocol, upload
from serve_app.api.app import Parts
from serve_app.api.pipeline import Call
from serve_app.errors import ApiError
from serve_app.heads.headfile import NAME, InvalidHead, parse_reference
from serve_app.heads.registry import HeadRegistry, pick_revision

router = APIRouter()


class HeadUploadFields(protocol.Closed):
    """PUT /v1/heads/{name} has no fields: the file is all."""


HEAD_UPLOAD = upload.UploadSpec(HeadUploadFields, "the head file (safetensors, as written "
                                "by `emotion2vec-serve heads train --out`)", noun="head file")


class HeadSummary(protocol.Open):
    name: str
    revisions: list[int]
    latest: int
    kind: str
    labels: list[str]
    backbone: dict
    metrics: dict = Field(description="the latest revision's cross-validated ua, wa, macro_f1")
    created: str | None = None


class HeadsAnswer(protocol.Closed):
    heads: list[HeadSummary]


class HeadDetail(protocol.Open):
    """A revision's whole metadata (metrics with the confusion matrix, the training summary)
    and the head's live revisions."""

    name: str
    revision: int
    revisions: list[int]
    kind: str
    labels: list[str]
    sha256: str


class HeadDeleted(protocol.Closed):
    name: str
    deleted: list[int]


def _summary(registry: HeadRegistry, name: str) -> dict | None:
    revisions = registry.revisions(name)
    if not revisions:
        return None  # deleted meanwhile
    meta = registry.metadata(name, revisions[-1])
    metrics = meta.get("metrics") or {}
    overall = metrics.get("overall", metrics) if isinstance(metrics, dict) else {}
    return {"name": name, "revisions": revisions, "latest": revisions[-1], "kind": meta["kind"],
            "labels": meta["labels"], "backbone": meta["backbone"],
            "metrics": {key: overall.get(key) for key in ("ua", "wa", "macro_f1")},
            "created": meta.get("created")}


def _all_summaries(registry: HeadRegistry) -> list[dict]:
    return [summary for name in registry.names()
            if (summary := _summary(registry, name)) is not None]


def _detail(registry: HeadRegistry, name: str, revision: int | None) -> dict:
    revisions = registry.revisions(name)
    revision = pick_revision(name, revision, revisions)
    return {**registry.metadata(name, revision), "revision": revision, "revisions": revisions}


async def _registry_call(call: Call, function: Callable, *args):
    """A registry operation, as every use of heads_dir runs (Pipeline.heads_io)."""
    call.trace["route"] = "heads"
    return await call.pipeline.heads_io(function, *args)


@router.get("/v1/heads", summary="The custom heads: revisions, backbone, labels, metrics",
            response_model=HeadsAnswer, responses=protocol.errors(401, 429, 503))
async def list_heads(request: Request, parts: Parts) -> JSONResponse:
    async with parts.pipeline.request(request, kind="heads") as call:
        heads = await _registry_call(call, _all_summaries, parts.pipeline.heads.registry)
        return call.respond(JSONResponse({"heads": heads}))


@router.get("/v1/heads/{reference}", summary="One head revision, everything: NAME (the "
            "latest) or NAME@REV", response_model=HeadDetail,
            responses=protocol.errors(401, 404, 422, 429, 503))
async def describe_head(reference: str, request: Request, parts: Parts) -> JSONResponse:
    async with parts.pipeline.request(request, kind="heads") as call:
        name, revision = parse_reference(reference)
        detail = await _registry_call(call, _detail, parts.pipeline.heads.registry, name,
                                      revision)
        return call.respond(JSONResponse(detail))


@router.put("/v1/heads/{name}", summary="Register a head file as the next revision of NAME",
            openapi_extra=HEAD_UPLOAD.openapi(), status_code=201,
            responses={201: {"model": protocol.HeadUsed},
                       **protocol.errors(400, 401, 403, 413, 422, 429, 503)})
async def put_head(name: str, request: Request, parts: Parts) -> JSONResponse:
    pipeline = parts.pipeline
    async with pipeline.request(request, kind="heads") as call:
        pipeline.access.check_heads_write(call.admission)
        if not NAME.fullmatch(name):
            raise InvalidHead(f"invalid name {name[:80]!r}: lower-case letters, digits, '.', "
                              "'_' and '-', at most 63").api_error()
        limit = call.settings.heads.max_head_bytes
        try:
            sent = await upload.read_upload(request, HEAD_UPLOAD, limit)
        except ApiError as exc:
            if exc.status != 413:
                raise
            raise InvalidHead(f"larger than {limit} bytes").api_error() from None
        head = await _registry_call(call, pipeline.heads.registry.put, sent.data, name)
        pipeline.heads.forget(name)
        call.trace["head"] = f"{head.name}@{head.revision}"
        return call.respond(JSONResponse(head.reference(), status_code=201))


@router.delete("/v1/heads/{reference}", summary="Delete a head revision (NAME@REV) or every "
               "revision (NAME): requests for it answer 404 within heads.refresh_s",
               response_model=HeadDeleted,
               responses=protocol.errors(401, 403, 404, 422, 429, 503))
async def delete_head(reference: str, request: Request, parts: Parts) -> JSONResponse:
    pipeline = parts.pipeline
    async with pipeline.request(request, kind="heads") as call:
        pipeline.access.check_heads_write(call.admission)
        name, revision = parse_reference(reference)
        deleted = await _registry_call(call, pipeline.heads.registry.delete, name, revision)
        pipeline.heads.forget(name)
        return call.respond(JSONResponse({"name": name, "deleted": deleted}))
