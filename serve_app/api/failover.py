"""Requests lost with a Router replica: replayed once, or answered 503 with Retry-After.

This module runs inside Ray Serve's HTTP proxy, not in a replica. When the replica that holds a
request dies before answering (its node lost, its process killed), Ray Serve 2.60's proxy ends
the request without a response and the client gets the ASGI server's plain-text `500 Internal
Server Error`. (Requests not yet accepted by a replica are routed again by Serve itself; see
docs/high-availability.md.) This middleware wraps the proxy: it keeps a copy of each request
body while the request runs, and when the proxy ends a request without having started a
response, it sends the request through the proxy once more, which now routes it to a replica
that is alive, if the request is safe to repeat (GET, HEAD, OPTIONS, and POST .../v1/predict
and .../v1/segments: inference has no side effects). Otherwise, or when the second try is lost
too, it answers `503 {"error": {"code": "replica_lost", ...}}` with Retry-After.

Enable it on every node before Ray starts there (the proxy reads it once, at its start):

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.api.failover.proxy_middlewares

(the Makefile, serve_app/tools/cluster.py and the KubeRay manifest set it). No torch, no Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import OrderedDict

from starlette.middleware import Middleware

logger = logging.getLogger("ray.serve")

ENV_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
IMPORT_PATH = "serve_app.api.failover.proxy_middlewares"
ATTEMPTS = 2            # the first try and one replay
MAX_REPLAY_BYTES = 16 * 1024 * 1024  # bodies kept for a replay; a larger one is not replayed
RETRY_AFTER_S = 1
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS")
# Path endings: the app may sit under a route prefix.
IDEMPOTENT_POSTS = ("/v1/predict", "/v1/segments")
LOST_MEMORY_S = 600.0   # a body lost with a replica is not replayed again for this long
MAX_LOST_BODIES = 1024  # fingerprints kept


def active() -> bool:
    """Whether the proxies on this node were started with this middleware: the variable is set
    on every node before Ray starts, so the Router's process inherits it as they do."""
    return os.environ.get(ENV_VAR) == IMPORT_PATH


def replayable(scope: dict) -> bool:
    """Whether a request may be sent twice: reads, and inference."""
    method = scope.get("method", "")
    return method in IDEMPOTENT_METHODS or (
        method == "POST" and scope.get("path", "").rstrip("/").endswith(IDEMPOTENT_POSTS))


class _Body:
    """The request's messages as the proxy reads them, kept for a replay (up to a limit) only
    while a replay may still happen: `release()` drops them."""

    def __init__(self, receive, keep: bool):
        self._receive = receive
        self.keep = keep
        self.kept: list[dict] = []
        self.size = 0
        self.too_large = False
        self.disconnected = False

    def release(self) -> None:
        self.keep, self.kept = False, []

    def digest(self) -> str:
        """The kept body's fingerprint (with its method and path, added by the caller)."""
        hashed = hashlib.sha256()
        for message in self.kept:
            hashed.update(message.get("body", b""))
        return hashed.hexdigest()

    def receiver(self):
        """A receive callable for one try: the kept messages first, then the client's."""
        replay = list(self.kept)

        async def receive() -> dict:
            if replay:
                return replay.pop(0)
            message = await self._receive()
            if message["type"] == "http.request":
                self.size += len(message.get("body", b""))
                if self.size > MAX_REPLAY_BYTES:
                    self.too_large = True
                    self.release()
                if self.keep:
                    self.kept.append(message)
            elif message["type"] == "http.disconnect":
                self.disconnected = True
            return message

        return receive


class LostBodies:
    """Fingerprints of requests lost with a replica in the last LOST_MEMORY_S (in this
    proxy): a request lost before may be what killed its replica (a body that crashes a
    decoder, say), so a second loss is answered 503, not replayed into a third replica.
    Bounded: the oldest fingerprints go first."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lost: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def _forget_old(self) -> None:
        now = self._clock()
        while self._lost and (len(self._lost) > MAX_LOST_BODIES
                              or now - next(iter(self._lost.values()))[1] > LOST_MEMORY_S):
            self._lost.popitem(last=False)

    def times_lost(self, digest: str) -> int:
        self._forget_old()
        return self._lost.get(digest, (0, 0.0))[0]

    def lost(self, digest: str) -> int:
        """Count one more loss of this body; returns how often it was lost."""
        count = self.times_lost(digest) + 1
        self._lost.pop(digest, None)
        self._lost[digest] = (count, self._clock())
        return count


class ReplayLostRequests:
    """ASGI middleware around the proxy (see the module docstring)."""

    def __init__(self, app):
        self.app = app
        self.lost_bodies = LostBodies()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # WebSockets and lifespan pass through
            return await self.app(scope, receive, send)
        may_replay = replayable(scope)
        body = _Body(receive, keep=may_replay)
        replayed = False
        for attempt in range(1, ATTEMPTS + 1):
            started = False

            async def tracked_send(message: dict) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                    body.release()  # answered: no replay can follow
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
            digest = f"{scope['method']} {scope.get('path', '')} {body.digest()}"
            if self.lost_bodies.lost(digest) > 1:
                logger.warning("%s %s was lost with a replica before: it may be what stops "
                               "them, so it is not sent again", scope["method"], scope["path"])
                break
            logger.warning("%s %s was lost with the replica that held it; sending it again",
                           scope["method"], scope["path"])
            replayed = True
        await _unavailable(send, "twice" if replayed else
                           "once (it is not safe to repeat)" if not may_replay or body.too_large
                           else "once (it was lost with a replica before)")


async def _unavailable(send, tried: str) -> None:
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
