"""The service's own routes: the web page, `POST /v1/predict`, `WS /v1/stream`, `GET
/v1/models`, `GET /v1/rollouts`, `GET /health` and `GET /ready`. Each is parse -> request
pipeline (serve_app/api/pipeline.py) -> shape, over the app's Services (serve_app/api/app.py).

No torch here: the router decodes audio (CPU work kept off GPU replicas), rejects bad input
before it costs a model slot, and forwards a 16 kHz mono float32 array to the variant's
deployment through its handle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import time
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response

from serve_app.api import failover, protocol, readiness, upload
from serve_app.api import responses as results
from serve_app.api.app import Parts
from serve_app.api.pipeline import HEAD_IN_MODEL_NAME
from serve_app.api.stream import StreamHooks, refuse
from serve_app.api.stream_protocol import INTERNAL, NORMAL, TRY_LATER, StreamError, parse_params
from serve_app.errors import ApiError
from serve_app.wire import InferenceOptions, VariantAnswer

router = APIRouter()

# The web page (serve_app/api/web, installed as package data): served as files, no build step.
WEB_DIR = Path(__file__).resolve().parent / "web"
WEB_ASSETS = {"app.js": "text/javascript", "live.js": "text/javascript",
              "conversation.js": "text/javascript", "heads.js": "text/javascript",
              "style.css": "text/css"}
_NO_CACHE = {"Cache-Control": "no-cache"}  # a redeploy with a new page shows at once

PREDICT = upload.UploadSpec(protocol.PredictFields, "the audio: " + upload.AUDIO_FORMATS)
# The access log's status of a stream, by how it closed.
_STREAM_STATUS = {NORMAL: 200, TRY_LATER: 503, INTERNAL: 500}


@router.get("/", response_class=HTMLResponse,
            summary="The web page: try the models in a browser")
async def page(request: Request) -> HTMLResponse:
    page = await asyncio.to_thread((WEB_DIR / "index.html").read_text, encoding="utf-8")
    # The page's URLs are relative to its base: the app's route prefix.
    base = html.escape(request.scope.get("root_path", "").rstrip("/") + "/")
    return HTMLResponse(page.replace('<base href="/">', f'<base href="{base}">'),
                        headers=_NO_CACHE)


@router.get("/web/{name}", include_in_schema=False)
async def web_asset(name: str) -> Response:
    if name not in WEB_ASSETS:  # a fixed list: no path from the request reaches the disk
        raise ApiError(404, "not_found", f"no web asset {name[:64]!r}")
    data = await asyncio.to_thread((WEB_DIR / name).read_bytes)
    return Response(data, media_type=WEB_ASSETS[name], headers=_NO_CACHE)


@router.post("/v1/predict", summary="Recognise the emotion in one audio clip",
             openapi_extra=PREDICT.openapi(),
             responses={200: {"model": protocol.Prediction},
                        **protocol.errors(400, 401, 404, 409, 413, 415, 422, 429, 503,
                                          504)})
async def predict(request: Request, parts: Parts) -> JSONResponse:
    async with parts.pipeline.request(request) as call:
        sent = await upload.read_upload(request, PREDICT, call.settings.max_upload_bytes)
        route = call.resolve(sent.params.get("model_version"))
        options = await call.choose_head(upload.parse_options(sent.params),
                                         sent.params.get("head"))
        decoded = await call.decode(sent.data)
        answer = await call.infer(route, decoded.waveform, options)
        result = results.prediction(
            answer, request_id=call.request_id, variant=route.variant,
            routed_by=route.routed_by, granularity=options.granularity,
            audio=results.audio_fields(decoded.duration_s, decoded.sample_rate,
                                       decoded.channels, decoded.format),
            extract_embedding=options.extract_embedding)
        result["timings_ms"] = call.timings_ms(answer)
        await call.save(result, answer.embedding if options.extract_embedding else None)
        return call.respond(JSONResponse(result))


@router.websocket("/v1/stream")
async def live(websocket: WebSocket, parts: Parts) -> None:
    """Live emotion: PCM in, window events out (serve_app/api/stream.py), admitted and logged
    by the same request pipeline as every route."""
    pipeline, started = parts.pipeline, time.monotonic()
    await websocket.accept()  # first: errors are events on the socket, then a close code
    try:
        # Browsers cannot set headers on a WebSocket: the key may come as `api_key`.
        async with pipeline.request(websocket, websocket.query_params.get("api_key"),
                                    kind="stream") as call:
            try:
                params = parse_params(websocket.query_params, call.settings)
                route = call.resolve(params.model_version, params.session_key)
                options = await call.choose_head(InferenceOptions(labels=params.labels),
                                                 params.head, params.session_key)
                params = dataclasses.replace(params, head_ref=options.head)
                await pipeline.check_labels(route.variant, params.labels, options.head)
            except StreamError as exc:
                call.status, call.trace["code"] = 400, exc.code
                return await refuse(websocket, exc)

            def charge(seconds: float) -> None:
                """Streamed audio counts against the key's audio quota as it arrives."""
                call.charge(seconds)
                pipeline.access.check_audio(call.admission.key_id)

            def shadow(waveform: np.ndarray, answer: VariantAnswer) -> None:
                call.submit_shadows(route.variant, waveform, answer, params.head_ref)  # whole

            closed = await parts.streams.run(websocket, route, params, call.settings,
                                             call.request_id, started,
                                             StreamHooks(charge, shadow, call.trace))
            call.status = _STREAM_STATUS.get(closed, 400)
    except ApiError as exc:  # refused on admission or routing: the error event, then close
        await refuse(websocket, StreamError.from_api(exc))


@router.get("/v1/models", summary="Variants, their state and the version mapping",
            response_model=protocol.ModelsAnswer, responses=protocol.errors(401, 429))
async def models(request: Request, parts: Parts) -> JSONResponse:
    pipeline = parts.pipeline
    admission = pipeline.admit(request, {})
    return JSONResponse({
        "default_version": pipeline.settings.default_version,
        "aliases": pipeline.settings.aliases,
        "variants": results.without_paths(await pipeline.variants.info()),
        "heads": {"parameter": "head=NAME, NAME@REV or a head alias (predict, segments, "
                               "stream; KServe v2's parameters.head)",
                  "model_name": f"VARIANT{HEAD_IN_MODEL_NAME}HEAD[@REV] (Hugging Face and "
                                "KServe v2 model names; '+HEAD': the default variant)",
                  "aliases": pipeline.settings.heads.aliases, "list": "/v1/heads"},
    }, headers=admission.headers)


@router.get("/v1/rollouts", summary="Each alias's split and the shadow comparisons since the "
            "last change of routes or shadows (this router replica)",
            response_model=protocol.RolloutsAnswer, responses=protocol.errors(401, 429))
async def rollouts(request: Request, parts: Parts) -> JSONResponse:
    pipeline = parts.pipeline
    admission = pipeline.admit(request, {})
    return JSONResponse({"routes": pipeline.routes.fractions(),
                         "shadow": pipeline.shadow.snapshot()}, headers=admission.headers)


@router.get("/health", summary="Liveness of the router, with each variant's state",
            response_model=protocol.HealthAnswer)
async def health(parts: Parts) -> JSONResponse:
    return JSONResponse({"status": "ok", "variants": await parts.pipeline.variants.states(),
                         "replay_middleware": failover.active()})


@router.get("/ready", summary="200 when this pod can serve requests (docs/api.md); "
            "?variant=NAME: when that variant can, else 503",
            response_model=protocol.ReadyAnswer,
            responses={503: {"model": protocol.ReadyAnswer}, **protocol.errors(404)})
async def ready(parts: Parts, variant: str | None = None) -> JSONResponse:
    infos = await parts.pipeline.variants.info()
    if variant is not None:
        if variant not in infos:
            raise ApiError(404, "unknown_variant", f"no variant {variant[:64]!r}; variants: "
                           f"{list(infos)}", valid=list(infos))
        ok = readiness.all_can_serve({variant: infos[variant]})
    else:
        ok = readiness.pod_ready(infos)
    return JSONResponse({"ready": ok, "variants": {n: i["state"] for n, i in infos.items()}},
                        status_code=200 if ok else 503, headers=readiness.not_ready_headers(ok))
