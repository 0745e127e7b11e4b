"""The ingress: the Serve `Router` deployment, a thin shell over the HTTP application
(serve_app/api/app.py, whose routes live in one APIRouter per feature). On each replica it
builds the router's parts (the request pipeline over the variants' handles, the recordings
route, the open streams), serves the app built over them, applies its user_config live, and
shares quota notes with the other replicas in the background.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.api import failover
from serve_app.api.app import Services, build_api
from serve_app.api.pipeline import Pipeline
from serve_app.api.quota_board import GcsBoard, share_quotas
from serve_app.api.variant_client import Variants
from serve_app.config import RouterSettings, without_inputs
from serve_app.metrics import RouterMetrics
from serve_app.traffic.quota_share import QuotaShare

logger = logging.getLogger("ray.serve")


@serve.deployment(
    name="Router",
    max_ongoing_requests=256,
    health_check_period_s=10,
)
@serve.ingress()
class Router:
    def __init__(self, variants: dict[str, DeploymentHandle],
                 vad: DeploymentHandle | None = None):
        pipeline = Pipeline(Variants(variants), RouterMetrics(),
                            RouterSettings(default_version=next(iter(variants))))
        self.services = Services.create(pipeline, vad)
        self.quota_share, self._quota_task = QuotaShare(pipeline.access), None
        if not failover.active():
            logger.warning("the proxy's replay middleware is off: a request lost with a Router "
                           "replica is answered with a plain 500. Start Ray with %s=%s",
                           failover.ENV_VAR, failover.IMPORT_PATH)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve's hook, after __init__: the app this replica serves."""
        return build_api(self.services)

    async def reconfigure(self, user_config: dict) -> None:
        try:
            settings = RouterSettings.model_validate(user_config)
        except ValidationError as exc:
            raise ValueError(f"Router user_config: {without_inputs(exc)}") from None
        await self.services.pipeline.configure(settings)
        self._share_quotas()

    def _share_quotas(self) -> None:
        """Start exchanging quota notes with the other Router replicas (once)."""
        if self._quota_task is None:
            context = serve.get_replica_context()
            board = GcsBoard(context.app_name, context.replica_id.unique_id)
            pipeline = self.services.pipeline
            self._quota_task = asyncio.create_task(share_quotas(
                self.quota_share, board, lambda: pipeline.settings.quota_sync_s))
