"""The ingress: the HTTP API. A thin layer: it checks the caller's API key and quota
(serve_app.traffic.access), reads the request (serve_app.api.upload), resolves the model
version, decodes the audio (serve_app.audio), calls the variant (serve_app.api.variant_client)
and shapes the answer (serve_app.api.responses).

No torch here: the router decodes audio (CPU work kept off GPU replicas), rejects bad input
before it costs a model slot, and forwards a 16 kHz mono float32 array to the variant's
deployment through its handle.
"""

import asyncio
import html
import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import HTTPConnection

from serve_app.api import responses as results
from serve_app.api import upload
from serve_app.api.quota_board import GcsBoard, share_quotas
from serve_app.api.stream import StreamHooks, Streams, refuse
from serve_app.api.stream_protocol import StreamError, parse_params
from serve_app.api.variant_client import Variants
from serve_app.audio.pool import Decoder
from serve_app.audio.waveform import Limits
from serve_app.config import RouterSettings, without_inputs
from serve_app.errors import ApiError
from serve_app.metrics import RouterMetrics, StreamMetrics
from serve_app.traffic.access import AccessControl, AccessDenied, Admission
from serve_app.traffic.quota_share import QuotaShare
from serve_app.traffic.routing import Route, RoutingTable
from serve_app.traffic.shadow import Shadow

access_log = logging.getLogger("ray.serve.emotion2vec.access")

# The web page (serve_app/web, installed as package data): served as files, no build step.
WEB_DIR = Path(__file__).resolve().parent / "web"
WEB_ASSETS = {"app.js": "text/javascript", "live.js": "text/javascript", "style.css": "text/css"}
_NO_CACHE = {"Cache-Control": "no-cache"}  # a redeploy with a new page shows at once

api = FastAPI(
    title="emotion2vec-serve",
    description="Speech emotion recognition with emotion2vec+ (base, large, turbo) on Ray Serve.",
    version="0.1.0",
)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(results.without_paths(exc.body()), status_code=exc.status,
                        headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": {"code": "invalid_request", "message": str(exc)}},
                        status_code=422)


@serve.deployment(
    name="Router",
    max_ongoing_requests=256,
    health_check_period_s=10,
)
@serve.ingress(api)
class Router:
    def __init__(self, variants: dict[str, DeploymentHandle]):
        self.variants = Variants(variants)
        self.settings = RouterSettings(default_version=next(iter(variants)))
        self.metrics = RouterMetrics()
        self.streams = Streams(self.variants, StreamMetrics())
        self.access = AccessControl()
        self.quota_share, self._quota_task = QuotaShare(self.access), None
        self.decoder = Decoder(self.settings.decode_workers)
        self.routes = RoutingTable(self.settings.default_version, {}, self.variants.names)
        self.shadow = Shadow(self.variants, self.metrics.shadow)

    async def reconfigure(self, user_config: dict) -> None:
        try:
            settings = RouterSettings.model_validate(user_config)
        except ValidationError as exc:
            raise ValueError(f"Router user_config: {without_inputs(exc)}") from None
        settings.check_against(self.variants.names)
        self.access.configure(settings)  # a bad key file refuses the whole config
        self.settings = settings
        self._share_quotas()
        self.routes = RoutingTable(settings.default_version, settings.aliases,
                                   self.variants.names)
        self.shadow.configure(settings)
        if settings.decode_workers != self.decoder.workers:
            old, self.decoder = self.decoder, Decoder(settings.decode_workers)
            await old.close()

    def _share_quotas(self) -> None:
        """Start exchanging quota notes with the other Router replicas (once)."""
        if self._quota_task is None:
            context = serve.get_replica_context()
            board = GcsBoard(context.app_name, context.replica_id.unique_id)
            self._quota_task = asyncio.create_task(share_quotas(
                self.quota_share, board, lambda: self.settings.quota_sync_s))

    def _admit(self, connection: HTTPConnection, trace: dict,
               query_api_key: str | None = None) -> Admission:
        """The first step of every /v1 route, before anything is read: the caller's key and
        quota (401, 429), counted per key id."""
        try:
            admission = self.access.admit(connection.headers, query_api_key)
        except AccessDenied as exc:
            trace["key"] = exc.key_label
            self.metrics.access(exc.key_label, exc.code)
            raise
        trace["key"] = admission.label
        self.metrics.access(admission.label, "admitted")
        return admission

    def _charge_audio(self, admission: Admission, seconds: float) -> None:
        """Decoded audio counts against the key's audio quota."""
        self.access.charge_audio(admission.key_id, seconds)
        self.metrics.key_audio(admission.label, seconds)

    def _resolve(self, requested: str | None, session_key: str | None = None) -> Route:
        """The route for a requested model_version (None: the default); a session key makes
        a weighted alias's choice sticky."""
        route = self.routes.resolve(requested, session_key)
        if route is None:
            valid = self.routes.names
            raise ApiError(400, "unknown_model_version",
                           f"unknown model_version {requested!r}; valid: {valid}", valid=valid)
        return route

    @api.get("/", response_class=HTMLResponse,
             summary="The web page: try the models in a browser")
    async def page(self, request: Request) -> HTMLResponse:
        page = await asyncio.to_thread((WEB_DIR / "index.html").read_text, encoding="utf-8")
        # The page's URLs are relative to its base: the app's route prefix.
        base = html.escape(request.scope.get("root_path", "").rstrip("/") + "/")
        return HTMLResponse(page.replace('<base href="/">', f'<base href="{base}">'),
                            headers=_NO_CACHE)

    @api.get("/web/{name}", include_in_schema=False)
    async def web_asset(self, name: str) -> Response:
        if name not in WEB_ASSETS:  # a fixed list: no path from the request reaches the disk
            raise ApiError(404, "not_found", f"no web asset {name!r}")
        data = await asyncio.to_thread((WEB_DIR / name).read_bytes)
        return Response(data, media_type=WEB_ASSETS[name], headers=_NO_CACHE)

    @api.post("/v1/predict", summary="Recognise the emotion in one audio clip",
              openapi_extra=upload.PREDICT_OPENAPI)
    async def predict(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        request_id = upload.request_id(request)
        trace: dict = {"request_id": request_id, "key": None, "variant": None}
        status = 500
        try:
            admission = self._admit(request, trace)
            response = await self._predict(request, request_id, started, trace, admission)
            response.headers.update(admission.headers)
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
                                trace.get("audio_s"), trace.get("route"))

    async def _predict(self, request: Request, request_id: str, started: float,
                       trace: dict, admission: Admission) -> JSONResponse:
        settings = self.settings
        data, params = await upload.read_upload(request, settings.max_upload_bytes)
        route = self._resolve(params.get("model_version"), request.headers.get("x-session-key"))
        variant = route.variant
        trace.update(variant=variant, route=route.name)
        granularity = upload.parse_granularity(params.get("granularity"))
        extract_embedding = upload.parse_bool("extract_embedding",
                                              params.get("extract_embedding"))

        decode_started = time.perf_counter()
        decoded = await self.decoder.decode(data, Limits(
            settings.max_duration_s, settings.min_duration_s, settings.max_decoded_bytes,
            settings.max_decode_s))
        decode_ms = (time.perf_counter() - decode_started) * 1000
        trace.update(audio_s=round(decoded.duration_s, 3), decode_ms=round(decode_ms, 1))
        self._charge_audio(admission, decoded.duration_s)

        model_started = time.perf_counter()
        out = await self.variants.predict(variant, decoded.waveform, granularity,
                                          extract_embedding, settings.model_timeout_s)
        model_ms = (time.perf_counter() - model_started) * 1000
        trace["model_ms"] = round(model_ms, 1)

        result = results.prediction(
            out, request_id=request_id, variant=variant, routed_by=route.routed_by,
            granularity=granularity,
            audio=results.audio_fields(decoded.duration_s, decoded.sample_rate,
                                       decoded.channels, decoded.format),
            extract_embedding=extract_embedding)
        result["timings_ms"] = {
            "decode": round(decode_ms, 3),
            "queue_and_inference": round(model_ms, 3),
            "inference": out["timings_ms"]["inference"],
            "total": round((time.perf_counter() - started) * 1000, 3),
        }
        if settings.output_dir:
            await asyncio.to_thread(results.save_result, settings.output_dir, request_id, result,
                                    out["embedding"] if extract_embedding else None)
        self.shadow.submit(variant, decoded.waveform, out)  # in the background, bounded
        return JSONResponse(result)

    @api.websocket("/v1/stream")
    async def live(self, websocket: WebSocket) -> None:
        """Live emotion: PCM in, window events out (serve_app/api/stream.py)."""
        started, settings, log_fields = time.monotonic(), self.settings, {}
        await websocket.accept()  # first: errors are events on the socket, then a close code
        try:
            # Browsers cannot set headers on a WebSocket: the key may come as `api_key`.
            admission = self._admit(websocket, log_fields,
                                    websocket.query_params.get("api_key"))
            params = parse_params(websocket.query_params, settings)
            route = self._resolve(params.model_version,
                                  websocket.headers.get("x-session-key") or params.session_key)
        except ApiError as exc:
            return await refuse(websocket, StreamError.from_api(exc))
        except StreamError as exc:
            return await refuse(websocket, exc)

        def charge(seconds: float) -> None:
            """Streamed audio counts against the key's audio quota as it arrives."""
            self._charge_audio(admission, seconds)
            self.access.check_audio(admission.key_id)

        def shadow(waveform, out: dict) -> None:
            self.shadow.submit(route.variant, waveform, out)  # the whole stream's answer

        log_fields["route"] = route.name
        await self.streams.run(websocket, route, params, settings, upload.request_id(websocket),
                               started, StreamHooks(charge, shadow, log_fields))

    @api.get("/v1/models", summary="Variants, their state and the version mapping")
    async def models(self, request: Request) -> JSONResponse:
        admission = self._admit(request, {})
        return JSONResponse({
            "default_version": self.settings.default_version,
            "aliases": self.settings.aliases,
            "variants": results.without_paths(await self.variants.info()),
        }, headers=admission.headers)

    @api.get("/v1/rollouts", summary="Each alias's split and the shadow comparisons since "
             "the last change of routes or shadows (this router replica)")
    async def rollouts(self, request: Request) -> JSONResponse:
        admission = self._admit(request, {})
        return JSONResponse({"routes": self.routes.fractions(), "shadow": self.shadow.snapshot()},
                            headers=admission.headers)

    @api.get("/health", summary="Liveness of the router, with each variant's readiness")
    async def health(self) -> dict:
        infos = await self.variants.info()
        return {"status": "ok", "variants": {name: info["state"] for name, info in infos.items()}}

    @api.get("/ready", summary="200 when every variant is ready to serve, else 503")
    async def ready(self) -> JSONResponse:
        states = {n: i["state"] for n, i in (await self.variants.info()).items()}
        ready = all(state == "ready" for state in states.values())
        return JSONResponse({"ready": ready, "variants": states},
                            status_code=200 if ready else 503,
                            headers=None if ready else {"Retry-After": "5"})
