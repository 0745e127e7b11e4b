"""The ingress: HTTP API, version resolution, input checks, one JSON shape for all variants.

No torch here: the router decodes audio (CPU work kept off GPU replicas), rejects bad input
before it costs a model slot, and forwards a 16 kHz mono float32 array to the variant's
deployment through its handle.
"""


import asyncio
import json
import logging
import os
import re
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from serve_app.config import RouterSettings
from serve_app.decode_pool import Decoder
from serve_app.engine import english_name
from serve_app.errors import ApiError
from serve_app.metrics import RouterMetrics
from serve_app.waveform import Limits

logger = logging.getLogger("ray.serve")
access_log = logging.getLogger("ray.serve.emotion2vec.access")

GRANULARITIES = ("utterance", "frame")
PARAMS = ("model_version", "granularity", "extract_embedding")
FORM_FIELDS = ("file", *PARAMS)
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
# The web page (serve_app/web, installed as package data): served as files, no build step.
WEB_DIR = Path(__file__).resolve().parent / "web"
WEB_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
_NO_CACHE = {"Cache-Control": "no-cache"}  # a redeploy with a new page shows at once

# The route reads the request itself (a form, or the raw body): its schema is given here.
_PARAM_SCHEMAS = {
    "model_version": {"type": "string", "description": "a variant (base, large, turbo) or an "
                      "alias (see GET /v1/models); default: the router's default_version"},
    "granularity": {"type": "string", "enum": list(GRANULARITIES), "default": "utterance",
                    "description": "utterance: one embedding; frame: one per 20 ms frame, "
                    "and an emotion timeline"},
    "extract_embedding": {"type": "boolean", "default": False,
                          "description": "include the embedding"},
}
PREDICT_OPENAPI = {
    "parameters": [{"name": name, "in": "query", "required": False, "schema": schema,
                    "description": "with a raw body only: " + schema["description"]}
                   for name, schema in _PARAM_SCHEMAS.items()],
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "the audio: wav, flac, ogg, mp3, m4a, "
                                    "mp4/mov/3gp, webm/mkv, aac, wma, amr"},
                           **_PARAM_SCHEMAS}}},
        "application/octet-stream": {"schema": {
            "type": "string", "format": "binary",
            "description": "the audio file's bytes as the body; the fields as query parameters"}},
    }},
}

api = FastAPI(
    title="emotion2vec-serve",
    description="Speech emotion recognition with emotion2vec+ (base, large, turbo) on Ray Serve.",
    version="0.1.0",
)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": {"code": "invalid_request", "message": str(exc)}},
                        status_code=422)


def _parse_bool(name: str, value: str | None) -> bool:
    text = (value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ApiError(422, "invalid_parameter", f"{name} must be true or false, not {value!r}")


async def _read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    too_large = ApiError(413, "payload_too_large",
                         f"the upload is larger than the limit of {limit} bytes")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_upload(request: Request, max_bytes: int) -> tuple[bytes, dict[str, str]]:
    """(audio bytes, parameters) from a multipart form or a raw body with query parameters."""
    params = dict(request.query_params)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        body = await _read_capped(request, max_bytes + _FORM_OVERHEAD)

        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=1, max_fields=len(PARAMS), max_part_size=_FORM_OVERHEAD)
        except (MultiPartException, ValueError, KeyError) as exc:
            raise ApiError(400, "malformed_form", f"the multipart form is malformed: {exc}")
        except Exception as exc:  # starlette raises HTTPException for over-limit forms
            raise ApiError(400, "malformed_form", f"the multipart form was refused: {exc}")
        unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
        if unknown:
            raise ApiError(422, "unknown_field", f"unknown form fields {unknown}; expected "
                           f"{list(FORM_FIELDS)}")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "missing_file", "send the audio in the form field 'file'")
        data = await upload.read()
        if len(data) > max_bytes:
            raise ApiError(413, "payload_too_large",
                           f"the upload is larger than the limit of {max_bytes} bytes")
        params.update({key: value for key, value in form.items() if isinstance(value, str)})
    elif content_type.startswith("application/x-www-form-urlencoded"):
        raise ApiError(422, "missing_file", "send the audio as multipart/form-data in the field "
                       "'file', or as the raw request body")
    else:
        data = await _read_capped(request, max_bytes)
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ApiError(422, "unknown_field",
                       f"unknown parameters {unknown}; expected {list(PARAMS)}")
    return data, params


def _request_id(request: Request) -> str:
    """Serve's request id (the client's X-Request-ID, or one Serve made), so that logs and the
    response's X-Request-ID header agree; a fresh one when it is unsafe as a folder name."""
    candidate = request.headers.get("x-request-id", "")
    return candidate if _SAFE_ID.match(candidate) else uuid.uuid4().hex


def _timeline_window(labels: list[str], window: dict) -> dict:
    """One timeline window in the response's shape: times, emotion, scores by English name."""
    best = int(np.argmax(window["scores"]))
    return {"start_s": window["start_s"], "end_s": window["end_s"],
            "emotion": english_name(labels[best]), "confidence": window["scores"][best],
            "scores": {english_name(label): score
                       for label, score in zip(labels, window["scores"])}}


def _save_result(output_dir: str, request_id: str, result: dict,
                 embedding: np.ndarray | None) -> None:
    """Write result.json (and embedding.npy) under output_dir/request_id, all or nothing."""
    root = Path(output_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{request_id}.", dir=root))
    (staging / "result.json").write_text(json.dumps(result))
    if embedding is not None:
        np.save(staging / "embedding.npy", embedding)
    os.rename(staging, root / request_id)


@serve.deployment(
    name="Router",
    max_ongoing_requests=256,
    health_check_period_s=10,
)
@serve.ingress(api)
class Router:
    def __init__(self, variants: dict[str, DeploymentHandle]):
        self.variants = variants
        self.settings = RouterSettings(default_version=next(iter(variants)))
        self.metrics = RouterMetrics()
        self.decoder = Decoder(self.settings.decode_workers)

    async def reconfigure(self, user_config: dict) -> None:
        settings = RouterSettings.model_validate(user_config)
        settings.check_against(list(self.variants))
        self.settings = settings
        if settings.decode_workers != self.decoder.workers:
            old, self.decoder = self.decoder, Decoder(settings.decode_workers)
            await old.close()

    def _resolve(self, requested: str | None) -> str:
        variant = self.settings.resolve(requested, list(self.variants))
        if variant is None:
            valid = sorted([*self.variants, *self.settings.aliases])
            raise ApiError(400, "unknown_model_version",
                           f"unknown model_version {requested!r}; valid: {valid}", valid=valid)
        return variant

    @api.get("/", response_class=HTMLResponse,
             summary="The web page: try the models in a browser")
    async def page(self) -> HTMLResponse:
        html = await asyncio.to_thread((WEB_DIR / "index.html").read_text, encoding="utf-8")
        return HTMLResponse(html, headers=_NO_CACHE)

    @api.get("/web/{name}", include_in_schema=False)
    async def web_asset(self, name: str) -> Response:
        if name not in WEB_ASSETS:  # a fixed list: no path from the request reaches the disk
            raise ApiError(404, "not_found", f"no web asset {name!r}")
        data = await asyncio.to_thread((WEB_DIR / name).read_bytes)
        return Response(data, media_type=WEB_ASSETS[name], headers=_NO_CACHE)

    @api.post("/v1/predict", summary="Recognise the emotion in one audio clip",
              openapi_extra=PREDICT_OPENAPI)
    async def predict(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        request_id = _request_id(request)
        trace: dict = {"request_id": request_id, "variant": None}
        status = 500
        try:
            response = await self._predict(request, request_id, started, trace)
            status = response.status_code
            return response
        except ApiError as exc:
            status, trace["code"] = exc.status, exc.code
            raise
        finally:
            # One line per request: ids, variant, outcome and durations; never audio.
            trace.update(status=status, total_ms=round((time.perf_counter() - started) * 1000, 1))
            access_log.info(json.dumps(trace))
            self.metrics.record(trace["variant"], status, trace["total_ms"],
                                trace.get("audio_s"))

    async def _predict(self, request: Request, request_id: str, started: float,
                       trace: dict) -> JSONResponse:
        settings = self.settings
        data, params = await _read_upload(request, settings.max_upload_bytes)
        variant = self._resolve(params.get("model_version"))
        trace["variant"] = variant
        granularity = params.get("granularity") or "utterance"
        if granularity not in GRANULARITIES:
            raise ApiError(422, "invalid_granularity",
                           f"granularity must be one of {list(GRANULARITIES)}, not "
                           f"{granularity!r}")
        extract_embedding = _parse_bool("extract_embedding", params.get("extract_embedding"))

        decode_started = time.perf_counter()
        decoded = await self.decoder.decode(data, Limits(
            settings.max_duration_s, settings.min_duration_s, settings.max_decoded_bytes,
            settings.max_decode_s))
        decode_ms = (time.perf_counter() - decode_started) * 1000
        trace.update(audio_s=round(decoded.duration_s, 3), decode_ms=round(decode_ms, 1))

        model_started = time.perf_counter()
        out = await self._call_model(variant, decoded.waveform, granularity, extract_embedding,
                                     settings.model_timeout_s)
        model_ms = (time.perf_counter() - model_started) * 1000
        trace["model_ms"] = round(model_ms, 1)

        scores = {english_name(label): score for label, score in zip(out["labels"], out["scores"])}
        best = int(np.argmax(out["scores"]))
        result = {
            "request_id": request_id,
            "model_version": variant,
            "emotion": english_name(out["labels"][best]),
            "label": out["labels"][best],
            "confidence": out["scores"][best],
            "scores": scores,
            "granularity": granularity,
            "audio": {"duration_s": round(decoded.duration_s, 4),
                      "sample_rate": decoded.sample_rate, "channels": decoded.channels,
                      "format": decoded.format},
            "model": out["model"],
        }
        if out.get("timeline") is not None:
            result["timeline"] = [_timeline_window(out["labels"], window)
                                  for window in out["timeline"]]
        embedding = out["embedding"]
        if extract_embedding:
            result["embedding"] = embedding.tolist()
        result["timings_ms"] = {
            "decode": round(decode_ms, 3),
            "queue_and_inference": round(model_ms, 3),
            "inference": out["timings_ms"]["inference"],
            "total": round((time.perf_counter() - started) * 1000, 3),
        }
        if settings.output_dir:
            await asyncio.to_thread(_save_result, settings.output_dir, request_id, result,
                                    embedding if extract_embedding else None)
        return JSONResponse(result)

    async def _call_model(self, variant: str, waveform: np.ndarray, granularity: str,
                          extract_embedding: bool, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        for attempt in (1, 2):
            try:
                return await self._call_once(variant, waveform, granularity, extract_embedding,
                                             max(0.1, deadline - time.monotonic()))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                # The replica died under the request. Inference has no side effects, so one
                # retry on another (or the restarted) replica is safe.
                logger.warning("variant %s: replica lost (attempt %d): %s", variant, attempt, exc)
                if attempt == 2 or time.monotonic() > deadline - 1:
                    raise ApiError(503, "model_unavailable",
                                   f"variant {variant} is unavailable; retry",
                                   headers={"Retry-After": "2"})
                await asyncio.sleep(0.5)
        raise AssertionError("unreachable")

    async def _call_once(self, variant: str, waveform: np.ndarray, granularity: str,
                         extract_embedding: bool, timeout_s: float) -> dict:
        response = self.variants[variant].predict.remote(waveform, granularity, extract_embedding)
        try:
            return await asyncio.wait_for(response, timeout=timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, "model_timeout",
                           f"variant {variant} did not answer within {timeout_s:g} s")
        except BackPressureError:
            raise ApiError(503, "overloaded", f"variant {variant} is at capacity; retry later",
                           headers={"Retry-After": "1"})
        except ray.exceptions.RayTaskError as exc:
            if type(exc.cause).__name__ == "InvalidInput":
                raise ApiError(422, "invalid_audio", str(exc.cause))
            if isinstance(exc.cause, (ray.exceptions.RayActorError,
                                      ray.exceptions.ActorUnavailableError)):
                raise exc.cause
            logger.error("variant %s failed: %s", variant, exc)
            raise ApiError(503, "model_error", f"variant {variant} failed on this request",
                           headers={"Retry-After": "1"})

    async def _variant_info(self, name: str, deployments: dict) -> dict:
        status = deployments.get(name)
        if status is not None and status.status in ("HEALTHY", "DOWNSCALING") and \
                not status.replica_states.get("RUNNING"):
            # Autoscaled to zero replicas: asking one would start one.
            return {"variant": name, "state": "scaled_to_zero", "error": None}
        try:
            return await asyncio.wait_for(self.variants[name].info.remote(), timeout=2.0)
        except Exception:
            failed = status is not None and status.status in ("UNHEALTHY", "DEPLOY_FAILED")
            return {"variant": name, "state": "failed" if failed else "loading",
                    "error": status.message if status is not None and failed else None}

    async def _all_variant_info(self) -> dict[str, dict]:
        app_name = serve.get_replica_context().app_name
        try:
            status = await asyncio.to_thread(serve.status)
            deployments = status.applications[app_name].deployments
        except Exception as exc:
            logger.warning("serve.status() failed: %r", exc)
            deployments = {}
        infos = await asyncio.gather(*(self._variant_info(n, deployments) for n in self.variants))
        return dict(zip(self.variants, infos))

    @api.get("/v1/models", summary="Variants, their state and the version mapping")
    async def models(self) -> dict:
        return {
            "default_version": self.settings.default_version,
            "aliases": self.settings.aliases,
            "variants": await self._all_variant_info(),
        }

    @api.get("/health", summary="Liveness of the router, with each variant's readiness")
    async def health(self) -> dict:
        infos = await self._all_variant_info()
        return {"status": "ok", "variants": {name: info["state"] for name, info in infos.items()}}

    @api.get("/ready", summary="200 when every variant is ready to serve, else 503")
    async def ready(self) -> JSONResponse:
        states = {n: i["state"] for n, i in (await self._all_variant_info()).items()}
        ready = all(state == "ready" for state in states.values())
        return JSONResponse({"ready": ready, "variants": states},
                            status_code=200 if ready else 503,
                            headers=None if ready else {"Retry-After": "5"})
