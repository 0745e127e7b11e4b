"""The HTTP application: every route, as one FastAPI app over the router's parts (`Services`).

Routes live in one `APIRouter` per feature (serve_app/api/routes.py: predict, the stream,
models, rollouts, health and the page; segments.py; hf.py; kserve.py), each receiving the
`Services` as a dependency. The Serve `Router` (serve_app/api/ingress.py) builds the app on its
replica with its own parts; a test builds it in-process over variants of its own
(tests/inprocess.py) and calls it with Starlette's TestClient: no cluster.

Errors: an ApiError anywhere is `{"error": {"code", "message", ...}}` with its status and
headers (KServe's routes answer their protocol's shape themselves); FastAPI's own validation
errors are 422 `invalid_request`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection

from serve_app.api.pipeline import Pipeline
from serve_app.api.responses import without_paths
from serve_app.errors import ApiError

TITLE = "emotion2vec-serve"
VERSION = "0.1.0"


@dataclass
class Services:
    """The router's parts every route uses: the request pipeline, the recordings route and
    the open streams (serve_app/api/segments.py, serve_app/api/stream.py)."""

    pipeline: Pipeline
    segments: object  # SegmentsRoute
    streams: object   # Streams
    jobs: object      # RayJobs: the cluster's job server (serve_app/jobs/ray_jobs.py)

    @classmethod
    def create(cls, pipeline: Pipeline, vad) -> Services:
        """The parts over a pipeline and the VAD deployment's handle (None: no VAD)."""
        from serve_app.api.segments import SegmentsRoute
        from serve_app.api.stream import Streams
        from serve_app.jobs.ray_jobs import RayJobs
        from serve_app.metrics import SegmentMetrics, StreamMetrics

        segments = SegmentsRoute(pipeline, vad, SegmentMetrics())
        return cls(pipeline, segments, Streams(pipeline.variants, StreamMetrics(),
                                               segments.finder), RayJobs())


def services(connection: HTTPConnection) -> Services:
    """The dependency every route takes: the Services of the app that serves it."""
    return connection.app.state.services


Parts = Annotated[Services, Depends(services)]  # a route's `parts: Parts` parameter


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(without_paths(exc.body()), status_code=exc.status, headers=exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": {"code": "invalid_request", "message": str(exc)}},
                        status_code=422)


def build_api(parts: Services) -> FastAPI:
    """The whole HTTP API over `parts`."""
    from serve_app.api import heads, hf, jobs, kserve, routes, segments

    api = FastAPI(title=TITLE, version=VERSION, description="Speech emotion recognition with "
                  "emotion2vec+ (base, large, turbo) on Ray Serve.")
    api.state.services = parts
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    for router in (routes.router, segments.router, heads.router, jobs.router, hf.router,
                   kserve.router):
        api.include_router(router)
    return api
