"""Requests lost with a Router replica: replayed once, or answered 503 with Retry-After.

This module runs inside Ray Serve's HTTP proxy, not in a replica. When the replica that holds a
request dies before answering (its node lost, its process killed), Ray Serve 2.60's proxy ends
the request without a response and the client gets the ASGI server's plain-text `500 Internal
Server Error`. (Requests not yet accepted by a replica are routed again by Serve itself; see
docs/high-availability.md.) This middleware wraps the proxy: it keeps a copy of each request
body while the request runs, and when the proxy ends a request without having started a
response, it sends the request through the proxy once more, which now routes it to a replica
that is alive, if the request is safe to repeat (GET, HEAD, OPTIONS, and POST .../v1/predict:
inference has no side effects). Otherwise, or when the second try is lost too, it answers
`503 {"error": {"code": "replica_lost", ...}}` with Retry-After.

Enable it on every node before Ray starts there (the proxy reads it once, at its start):

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.api.failover.proxy_middlewares

(the Makefile, serve_app/tools/cluster.py and the KubeRay manifest set it). No torch, no Ray.
"""

from __future__ import annotations

import json
import logging

from starlette.middleware import Middleware

logger = logging.getLogger("ray.serve")

ENV_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
IMPORT_PATH = "serve_app.api.failover.proxy_middlewares"
ATTEMPTS = 2            # the first try and one replay
MAX_REPLAY_BYTES = 16 * 1024 * 1024  # bodies kept for a replay; a larger one is not replayed
RETRY_AFTER_S = 1
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS")
IDEMPOTENT_POSTS = ("/v1/predict",)  # path endings: the app may sit under a route prefix


def replayable(scope: dict) -> bool:
    """Whether a request may be sent twice: reads, and inference."""
    method = scope.get("method", "")
    return method in IDEMPOTENT_METHODS or (
        method == "POST" and scope.get("path", "").rstrip("/").endswith(IDEMPOTENT_POSTS))


class _Body:
    """The request's messages as the proxy reads them, kept for a replay (up to a limit)."""

    def __init__(self, receive):
        self._receive = receive
        self.kept: list[dict] = []
        self.size = 0
        self.too_large = False
        self.disconnected = False

    def receiver(self):
        """A receive callable for one try: the kept messages first, then the client's."""
        replay = list(self.kept)

        async def receive() -> dict:
            if replay:
                return replay.pop(0)
            message = await self._receive()
            if message["type"] == "http.request":
                self.size += len(message.get("body", b""))
                self.too_large = self.too_large or self.size > MAX_REPLAY_BYTES
                if not self.too_large:
                    self.kept.append(message)
            elif message["type"] == "http.disconnect":
                self.disconnected = True
            return message

        return receive


class ReplayLostRequests:
    """ASGI middleware around the proxy (see the module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # WebSockets and lifespan pass through
            return await self.app(scope, receive, send)
        body = _Body(receive)
        may_replay = replayable(scope)
        for attempt in range(1, ATTEMPTS + 1):
            started = False

            async def tracked_send(message: dict) -> None:
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send(message)

            try:
                await self.app(dict(scope), body.receiver(), tracked_send)
            except Exception:
                if started:
                    raise
                logger.exception("the proxy failed on %s %s", scope["method"], scope["path"])
            if started or body.disconnected:  # answered, or nobody left to answer
                return
            if not may_replay or body.too_large or attempt == ATTEMPTS:
                break
            logger.warning("%s %s was lost with the replica that held it; sending it again",
                           scope["method"], scope["path"])
        await _unavailable(send, replayed=may_replay and not body.too_large)


async def _unavailable(send, replayed: bool) -> None:
    tried = "twice" if replayed else "once (it is not safe to repeat)"
    body = json.dumps({"error": {
        "code": "replica_lost",
        "message": f"the server that held this request stopped before answering; it was sent "
                   f"{tried}. Retry in {RETRY_AFTER_S} s",
        "retry_after_s": RETRY_AFTER_S}}).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode())]})
    await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Middleware]:
    """What RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names: the proxy's extra middlewares."""
    return [Middleware(ReplayLostRequests)]
