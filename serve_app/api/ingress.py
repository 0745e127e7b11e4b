"""The ingress: the HTTP API. Its routes are thin: each reads its request (serve_app.api.upload),
runs it through the request pipeline (serve_app.api.pipeline: the key and quota, the model
version, decoding within limits, the variant call, the access log and metrics) and shapes the
answer (serve_app.api.responses). The stream shares the pipeline's steps.

No torch here: the router decodes audio (CPU work kept off GPU replicas), rejects bad input
before it costs a model slot, and forwards a 16 kHz mono float32 array to the variant's
deployment through its handle.
"""

import asyncio
import html
import logging
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.api import failover, hf, kserve, readiness, upload
from serve_app.api import responses as results
from serve_app.api.pipeline import Pipeline
from serve_app.api.quota_board import GcsBoard, share_quotas
from serve_app.api.segments import SegmentsRoute
from serve_app.api.segments_upload import SEGMENTS_OPENAPI
from serve_app.api.stream import StreamHooks, Streams, refuse
from serve_app.api.stream_protocol import StreamError, parse_params
from serve_app.api.variant_client import Variants
from serve_app.config import RouterSettings, without_inputs
from serve_app.errors import ApiError
from serve_app.metrics import RouterMetrics, SegmentMetrics, StreamMetrics
from serve_app.traffic.quota_share import QuotaShare
from serve_app.wire import VariantAnswer

logger = logging.getLogger("ray.serve")

# The web page (serve_app/web, installed as package data): served as files, no build step.
WEB_DIR = Path(__file__).resolve().parent / "web"
WEB_ASSETS = {"app.js": "text/javascript", "live.js": "text/javascript",
              "conversation.js": "text/javascript", "style.css": "text/css"}
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
    def __init__(self, variants: dict[str, DeploymentHandle],
                 vad: DeploymentHandle | None = None):
        self.pipeline = Pipeline(Variants(variants), RouterMetrics(),
                                 RouterSettings(default_version=next(iter(variants))))
        self.segments = SegmentsRoute(self.pipeline, vad, SegmentMetrics())
        self.streams = Streams(self.pipeline.variants, StreamMetrics(), self.segments.finder)
        self.quota_share, self._quota_task = QuotaShare(self.pipeline.access), None
        if not failover.active():
            logger.warning("the proxy's replay middleware is off: a request lost with a Router "
                           "replica is answered with a plain 500. Start Ray with %s=%s",
                           failover.ENV_VAR, failover.IMPORT_PATH)

    async def reconfigure(self, user_config: dict) -> None:
        try:
            settings = RouterSettings.model_validate(user_config)
        except ValidationError as exc:
            raise ValueError(f"Router user_config: {without_inputs(exc)}") from None
        await self.pipeline.configure(settings)
        self._share_quotas()

    def _share_quotas(self) -> None:
        """Start exchanging quota notes with the other Router replicas (once)."""
        if self._quota_task is None:
            context = serve.get_replica_context()
            board = GcsBoard(context.app_name, context.replica_id.unique_id)
            self._quota_task = asyncio.create_task(share_quotas(
                self.quota_share, board, lambda: self.pipeline.settings.quota_sync_s))

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
        async with self.pipeline.request(request) as call:
            data, params = await upload.read_upload(request, call.settings.max_upload_bytes)
            route = call.resolve(params.get("model_version"),
                                 request.headers.get("x-session-key"))
            options = upload.parse_options(params)
            decoded = await call.decode(data)
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

    @api.post("/v1/segments", summary="Emotion per utterance and per speaker over a whole "
              "recording (docs/segments.md)", openapi_extra=SEGMENTS_OPENAPI)
    async def segments_route(self, request: Request) -> Response:
        return await self.segments.handle(request)

    @api.websocket("/v1/stream")
    async def live(self, websocket: WebSocket) -> None:
        """Live emotion: PCM in, window events out (serve_app/api/stream.py)."""
        pipeline, started, log_fields = self.pipeline, time.monotonic(), {}
        settings = pipeline.settings
        await websocket.accept()  # first: errors are events on the socket, then a close code
        try:
            # Browsers cannot set headers on a WebSocket: the key may come as `api_key`.
            admission = pipeline.admit(websocket, log_fields,
                                       websocket.query_params.get("api_key"))
            params = parse_params(websocket.query_params, settings)
            route = pipeline.resolve(params.model_version,
                                     websocket.headers.get("x-session-key") or params.session_key)
            await pipeline.variants.check_labels(route.variant, params.labels)
        except ApiError as exc:
            return await refuse(websocket, StreamError.from_api(exc))
        except StreamError as exc:
            return await refuse(websocket, exc)

        def charge(seconds: float) -> None:
            """Streamed audio counts against the key's audio quota as it arrives."""
            pipeline.charge_audio(admission, seconds)
            pipeline.access.check_audio(admission.key_id)

        def shadow(waveform: np.ndarray, answer: VariantAnswer) -> None:
            pipeline.shadow.submit(route.variant, waveform, answer)  # the whole stream's answer

        log_fields["route"] = route.name
        await self.streams.run(websocket, route, params, settings, upload.request_id(websocket),
                               started, StreamHooks(charge, shadow, log_fields))

    @api.get("/v1/models", summary="Variants, their state and the version mapping")
    async def models(self, request: Request) -> JSONResponse:
        pipeline = self.pipeline
        admission = pipeline.admit(request, {})
        return JSONResponse({
            "default_version": pipeline.settings.default_version,
            "aliases": pipeline.settings.aliases,
            "variants": results.without_paths(await pipeline.variants.info()),
        }, headers=admission.headers)

    @api.get("/v1/rollouts", summary="Each alias's split and the shadow comparisons since "
             "the last change of routes or shadows (this router replica)")
    async def rollouts(self, request: Request) -> JSONResponse:
        pipeline = self.pipeline
        admission = pipeline.admit(request, {})
        return JSONResponse({"routes": pipeline.routes.fractions(),
                             "shadow": pipeline.shadow.snapshot()}, headers=admission.headers)

    @api.get("/health", summary="Liveness of the router, with each variant's state")
    async def health(self) -> dict:
        return {"status": "ok", "variants": await self.pipeline.variants.states(),
                "replay_middleware": failover.active()}

    @api.get("/ready", summary="200 when this pod can serve requests (docs/operations.md); "
             "?variant=NAME: when that variant can, else 503")
    async def ready(self, variant: str | None = None) -> JSONResponse:
        states = await self.pipeline.variants.states()
        if variant is not None:
            if variant not in states:
                raise ApiError(404, "unknown_variant", f"no variant {variant!r}; variants: "
                               f"{list(states)}", valid=list(states))
            ready = readiness.all_can_serve({variant: states[variant]})
        else:
            ready = readiness.pod_ready(states)
        return JSONResponse({"ready": ready, "variants": states},
                            status_code=200 if ready else 503,
                            headers=readiness.not_ready_headers(ready))

    # -- Hugging Face audio-classification (serve_app/api/hf.py) -----------------------------
    @api.post("/v1/audio-classification", summary="Hugging Face audio-classification "
              "(InferenceClient.audio_classification), the default version")
    async def hf_classify(self, request: Request) -> JSONResponse:
        return await hf.classify(self.pipeline, request)

    @api.post("/v1/audio-classification/{model_version}",
              summary="Hugging Face audio-classification on a variant or alias")
    async def hf_classify_version(self, request: Request, model_version: str) -> JSONResponse:
        return await hf.classify(self.pipeline, request, model_version)

    # -- KServe Open Inference Protocol v2 (serve_app/api/kserve.py) -------------------------
    @api.get("/v2", summary="KServe v2: server metadata")
    async def v2_server(self) -> JSONResponse:
        return kserve.server(api.version)

    @api.get("/v2/health/live", summary="KServe v2: liveness (as /health)")
    async def v2_live(self) -> JSONResponse:
        return kserve.live()

    @api.get("/v2/health/ready", summary="KServe v2: readiness (as /ready)")
    async def v2_ready(self) -> JSONResponse:
        return await kserve.ready(self.pipeline)

    @api.get("/v2/models/{name}", summary="KServe v2: model metadata")
    async def v2_model(self, request: Request, name: str) -> Response:
        return await kserve.answer(kserve.metadata(self.pipeline, request, name))

    @api.get("/v2/models/{name}/versions/{version}", summary="KServe v2: model metadata")
    async def v2_model_version(self, request: Request, name: str, version: str) -> Response:
        return await kserve.answer(kserve.metadata(self.pipeline, request, name, version))

    @api.get("/v2/models/{name}/ready", summary="KServe v2: model readiness")
    async def v2_model_ready(self, request: Request, name: str) -> Response:
        return await kserve.answer(kserve.model_ready(self.pipeline, request, name))

    @api.get("/v2/models/{name}/versions/{version}/ready", summary="KServe v2: model readiness")
    async def v2_version_ready(self, request: Request, name: str, version: str) -> Response:
        return await kserve.answer(kserve.model_ready(self.pipeline, request, name, version))

    @api.post("/v2/models/{name}/infer", summary="KServe v2: inference (JSON or binary tensors)")
    async def v2_infer(self, request: Request, name: str) -> Response:
        return await kserve.answer(kserve.infer(self.pipeline, request, name))

    @api.post("/v2/models/{name}/versions/{version}/infer",
              summary="KServe v2: inference on a model version")
    async def v2_infer_version(self, request: Request, name: str, version: str) -> Response:
        return await kserve.answer(kserve.infer(self.pipeline, request, name, version))
