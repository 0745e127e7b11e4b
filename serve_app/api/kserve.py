"""KServe's Open Inference Protocol v2 (REST) routes: a thin adapter over the request pipeline
(serve_app/api/pipeline.py), so keys, quotas, routing, limits, the access log and metrics are
predict's own. The wire format (tensors, metadata, error shape) is serve_app/api/kserve_codec.py.

A model is a variant or an alias; its one version is the first 12 hex digits of its checkpoint's
sha256. Probes (`/v2`, `/v2/health/*`) are open, as `/health` is; `/v2/models/*` is admitted.
Every error on /v2 is answered in the protocol's shape, `{"error": "..."}`, with the service's
status and headers.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Awaitable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from serve_app.api import kserve_codec as codec
from serve_app.api import protocol, protocol_v2, readiness, upload
from serve_app.api.app import Parts
from serve_app.api.pipeline import model_and_head
from serve_app.errors import ApiError
from serve_app.labels import emotion_fields, english_name, parse_label_set
from serve_app.wire import TARGET_SR, InferenceOptions

if TYPE_CHECKING:
    from serve_app.api.pipeline import Pipeline

# A body this large is parsed in a worker process (a 40 MB JSON waveform takes seconds and
# ~0.4 GB, holding the GIL all along: a thread would still stop the event loop), at most
# PARSERS at once per router replica.
PROCESS_PARSE_BYTES = 256 * 1024
PARSERS = 2
_pool: ProcessPoolExecutor | None = None


def _parsers() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:  # spawned: a fork of a process with threads is unsafe
        _pool = ProcessPoolExecutor(PARSERS, mp_context=multiprocessing.get_context("spawn"))
    return _pool


async def parse(body: bytes, header_length: str | None) -> codec.InferRequest:
    """An infer request's body parsed (codec.parse_infer_request), big ones off the loop."""
    global _pool
    if len(body) < PROCESS_PARSE_BYTES:
        return codec.parse_infer_request(body, header_length)
    try:
        return await asyncio.get_running_loop().run_in_executor(
            _parsers(), codec.parse_infer_request, body, header_length)
    except BrokenProcessPool:  # a parser died (out of memory, killed): the next gets a new one
        _pool = None
        raise ApiError(503, "overloaded", "the request could not be parsed now; retry",
                       headers={"Retry-After": "1"}) from None


async def answer(route: Awaitable[Response]) -> Response:
    """A /v2 route's response; an ApiError in the protocol's shape, status and headers kept."""
    try:
        return await route
    except ApiError as exc:
        return JSONResponse(codec.error_body(exc), status_code=exc.status, headers=exc.headers)


def server(version: str) -> JSONResponse:
    return JSONResponse(codec.server_metadata(version))


def live() -> JSONResponse:
    return JSONResponse({"live": True})  # the router answers: as /health


async def ready(pipeline: Pipeline) -> JSONResponse:
    """The pod can serve requests: the same fact as /ready."""
    ok = readiness.pod_ready(await pipeline.variants.info())
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503,
                        headers=readiness.not_ready_headers(ok))


def _targets(pipeline: Pipeline, name: str) -> list[str]:
    """The variants a model name may route to (VARIANT+HEAD: VARIANT's)."""
    targets = pipeline.routes.targets(model_and_head(name)[0])
    if targets is None:
        valid = pipeline.routes.names
        raise ApiError(404, "unknown_model", f"no model {name!r}; models: {valid}", valid=valid)
    return targets


def _unknown_version(name: str, version: str, versions: list[str]) -> ApiError:
    return ApiError(404, "unknown_model_version",
                    f"model {name!r} has no version {version!r}; versions: {versions}",
                    valid=versions)


async def _model(pipeline: Pipeline, name: str,
                 version: str | None) -> tuple[dict[str, dict], list[str]]:
    """The infos of the variants a model name routes to, and its versions; 404 for an unknown
    name or version."""
    targets = _targets(pipeline, name)
    head = model_and_head(name)[1]
    if head is not None:
        await pipeline.choose_head(head, None)  # 404 unknown_head
    infos = await pipeline.variants.info()
    mine = {target: infos[target] for target in targets}
    versions = sorted({v for info in mine.values()
                       if (v := codec.model_version(info.get("sha256")))})
    if version is not None and version not in versions:
        raise _unknown_version(name, version, versions)
    return mine, versions


async def metadata(pipeline: Pipeline, request: Request, name: str,
                   version: str | None = None) -> JSONResponse:
    admission = pipeline.admit(request, {})
    infos, versions = await _model(pipeline, name, version)
    dims = [info.get("embedding_dim") for info in infos.values()]
    return JSONResponse(codec.model_metadata(name, versions, dims[0] if len(set(dims)) == 1
                                             else None), headers=admission.headers)


async def model_ready(pipeline: Pipeline, request: Request, name: str,
                      version: str | None = None) -> JSONResponse:
    """200 when every variant the name may route to can serve, else 503 (as
    /ready?variant=)."""
    admission = pipeline.admit(request, {})
    infos, _ = await _model(pipeline, name, version)
    ok = readiness.all_can_serve(infos)
    headers = {**admission.headers, **(readiness.not_ready_headers(ok) or {})}
    return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503,
                        headers=headers)


def inference_options(request: codec.InferRequest) -> InferenceOptions:
    params = request.parameters
    return InferenceOptions(granularity=upload.parse_granularity(params.get("granularity")),
                            extract_embedding="embedding" in request.outputs,
                            labels=parse_label_set(params.get("labels")))


async def infer(pipeline: Pipeline, request: Request, name: str,
                version: str | None = None) -> Response:
    async with pipeline.request(request) as call:
        _targets(pipeline, name)  # an unknown model is the protocol's 404
        model_version, head = model_and_head(name)  # VARIANT+HEAD: a custom head
        route = call.resolve(model_version)
        settings = call.settings
        header_length = request.headers.get(codec.HEADER_LENGTH)
        body = await upload.read_capped(request, codec.body_limit(
            header_length is not None, settings.max_upload_bytes, settings.max_duration_s,
            settings.max_json_waveform_bytes))
        parsed = await parse(body, header_length)
        given = codec.model_input(parsed, settings.max_upload_bytes)
        options = await call.choose_head(inference_options(parsed),
                                         head or parsed.parameters.get("head"))
        if given.audio is not None:
            decoded = await call.decode(given.audio)
        else:
            decoded = await call.accept(given.waveform, TARGET_SR)
        result = await call.infer(route, decoded.waveform, options)
        answered = codec.model_version(result.sha256)
        # Checked on the model that answered: a swap or a weighted pick cannot slip in another.
        if version is not None and version != answered:
            raise _unknown_version(name, version, [answered] if answered else [])
        outputs = codec.model_outputs([english_name(label) for label in result.labels],
                                      result.scores,
                                      emotion_fields(result.labels, result.scores)["emotion"],
                                      result.embedding)
        content, headers = codec.encode_infer_response(name, answered, parsed.id, outputs,
                                                       parsed.outputs)
        return call.respond(Response(content, headers=headers))


router = APIRouter(prefix="/v2")
_ERRORS = {status: {"model": protocol_v2.V2Error}
           for status in (400, 401, 404, 409, 413, 415, 422, 429, 503, 504)}
_METADATA = {200: {"model": protocol_v2.V2ModelMetadata}, **_ERRORS}
_READY = {200: {"model": protocol_v2.V2ModelReady}, **_ERRORS}
_INFER = {"responses": {200: {"model": protocol_v2.V2InferResponse, "content": {
              codec.BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
                        **_ERRORS},
          "openapi_extra": protocol.json_or_raw_body(
              protocol_v2.V2InferRequest, "the binary tensor extension: a JSON header of "
              "Inference-Header-Content-Length bytes, then each binary tensor's bytes")}


@router.get("", summary="KServe v2: server metadata", response_model=protocol_v2.V2ServerMetadata)
async def v2_server() -> JSONResponse:
    from serve_app.api.app import VERSION

    return server(VERSION)


@router.get("/health/live", summary="KServe v2: liveness (as /health)",
            response_model=protocol_v2.V2Live)
async def v2_live() -> JSONResponse:
    return live()


@router.get("/health/ready", summary="KServe v2: readiness (as /ready)",
            response_model=protocol_v2.V2Ready, responses={503: {"model": protocol_v2.V2Ready}})
async def v2_ready(parts: Parts) -> JSONResponse:
    return await ready(parts.pipeline)


@router.get("/models/{name}", summary="KServe v2: model metadata", responses=_METADATA)
async def v2_model(request: Request, name: str, parts: Parts) -> Response:
    return await answer(metadata(parts.pipeline, request, name))


@router.get("/models/{name}/versions/{version}", summary="KServe v2: model metadata",
            responses=_METADATA)
async def v2_model_version(request: Request, name: str, version: str, parts: Parts) -> Response:
    return await answer(metadata(parts.pipeline, request, name, version))


@router.get("/models/{name}/ready", summary="KServe v2: model readiness", responses=_READY)
async def v2_model_ready(request: Request, name: str, parts: Parts) -> Response:
    return await answer(model_ready(parts.pipeline, request, name))


@router.get("/models/{name}/versions/{version}/ready", summary="KServe v2: model readiness",
            responses=_READY)
async def v2_version_ready(request: Request, name: str, version: str,
                           parts: Parts) -> Response:
    return await answer(model_ready(parts.pipeline, request, name, version))


@router.post("/models/{name}/infer", summary="KServe v2: inference (JSON or binary tensors)",
             **_INFER)
async def v2_infer(request: Request, name: str, parts: Parts) -> Response:
    return await answer(infer(parts.pipeline, request, name))


@router.post("/models/{name}/versions/{version}/infer",
             summary="KServe v2: inference on a model version", **_INFER)
async def v2_infer_version(request: Request, name: str, version: str, parts: Parts) -> Response:
    return await answer(infer(parts.pipeline, request, name, version))
