"""The proxy middleware that replays requests lost with a replica (serve_app/api/failover.py),
on its own: ASGI apps of the test's own stand in for Ray Serve's proxy, which ends a request
without any response when the replica holding it dies. Through a real cluster: tests/multinode."""

from __future__ import annotations

import asyncio
import json

import pytest

from serve_app.api import failover


class Proxy:
    """Reads the whole body like the Serve proxy, then answers 200 with it, or, for the tries
    listed in `lose`, ends without a response."""

    def __init__(self, lose: set[int], raise_on_loss: bool = False):
        self.lose, self.raise_on_loss = lose, raise_on_loss
        self.tries: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.tries.append(body)
        if len(self.tries) in self.lose:
            if self.raise_on_loss:
                raise RuntimeError("replica died")
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def call(app, method: str, path: str, chunks: list[bytes], disconnect: bool = False) -> dict:
    """One HTTP request through the middleware (a new one around `app`, or `app` itself when
    it is one): the response's status, headers and body."""
    messages = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
                for i, chunk in enumerate(chunks)]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        if disconnect:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)  # a client that waits for its answer
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    middleware = app if isinstance(app, failover.ReplayLostRequests) else \
        failover.ReplayLostRequests(app)
    asyncio.run(asyncio.wait_for(middleware(scope, receive, send), 10))
    if not sent:
        return {}
    return {"status": sent[0]["status"], "headers": dict(sent[0]["headers"]),
            "body": b"".join(m.get("body", b"") for m in sent[1:])}


@pytest.mark.parametrize("raise_on_loss", [False, True])
def test_a_lost_predict_is_sent_again_with_its_whole_body(raise_on_loss):
    proxy = Proxy(lose={1}, raise_on_loss=raise_on_loss)
    response = call(proxy, "POST", "/prefix/v1/predict", [b"RIFF", b"-audio-", b"end"])
    assert response["status"] == 200 and response["body"] == b"RIFF-audio-end"
    assert proxy.tries == [b"RIFF-audio-end"] * 2


def test_lost_twice_is_a_json_503_with_retry_after():
    proxy = Proxy(lose={1, 2})
    response = call(proxy, "GET", "/v1/models", [b""])
    assert response["status"] == 503 and response["headers"][b"retry-after"] == b"1"
    error = json.loads(response["body"])["error"]
    assert error["code"] == "replica_lost" and "twice" in error["message"]
    assert len(proxy.tries) == 2


def test_what_is_not_safe_to_repeat_is_answered_503_not_replayed():
    proxy = Proxy(lose={1})
    response = call(proxy, "POST", "/v1/something-else", [b"x"])
    assert response["status"] == 503 and len(proxy.tries) == 1
    assert "not safe to repeat" in json.loads(response["body"])["error"]["message"]


def test_a_body_over_the_replay_limit_is_not_replayed(monkeypatch):
    monkeypatch.setattr(failover, "MAX_REPLAY_BYTES", 8)
    proxy = Proxy(lose={1})
    response = call(proxy, "POST", "/v1/predict", [b"12345", b"67890"])
    assert response["status"] == 503 and len(proxy.tries) == 1


def test_answered_requests_and_gone_clients_pass_untouched():
    proxy = Proxy(lose=set())
    assert call(proxy, "POST", "/v1/predict", [b"abc"])["body"] == b"abc"
    assert len(proxy.tries) == 1

    class Leaves:  # the client disconnected: the proxy ends without an answer, as Serve's does
        tries = 0

        async def __call__(self, scope, receive, send):
            Leaves.tries += 1
            while (await receive())["type"] != "http.disconnect":
                pass

    assert call(Leaves(), "POST", "/v1/predict", [b"abc"], disconnect=True) == {}
    assert Leaves.tries == 1


def test_replayable_requests():
    def scope(method: str, path: str) -> dict:
        return {"type": "http", "method": method, "path": path}

    assert failover.replayable(scope("GET", "/v1/models"))
    assert failover.replayable(scope("POST", "/v1/predict"))
    assert failover.replayable(scope("POST", "/app/v1/predict/"))
    assert failover.replayable(scope("POST", "/v1/segments"))
    assert not failover.replayable(scope("POST", "/v1/predictions"))
    assert not failover.replayable(scope("DELETE", "/v1/predict"))


def test_only_a_body_that_may_be_replayed_is_kept_and_only_until_answered(monkeypatch):
    bodies = []
    original = failover._Body.receiver

    def kept(self):
        bodies.append(self)
        return original(self)

    monkeypatch.setattr(failover._Body, "receiver", kept)
    assert call(Proxy(lose=set()), "POST", "/v1/stream-of-x", [b"x" * 1000])["status"] == 200
    assert not bodies[-1].keep and bodies[-1].kept == []  # never replayed: never copied
    assert call(Proxy(lose=set()), "POST", "/v1/predict", [b"y" * 1000])["status"] == 200
    assert bodies[-1].kept == []  # answered: released


def test_a_body_lost_before_is_not_replayed_into_a_third_replica():
    proxy = Proxy(lose={1, 3})
    middleware = failover.ReplayLostRequests(proxy)
    assert call(middleware, "POST", "/v1/predict", [b"poison"])["status"] == 200  # replayed
    assert len(proxy.tries) == 2
    lost_again = call(middleware, "POST", "/v1/predict", [b"poison"])
    assert lost_again["status"] == 503 and len(proxy.tries) == 3  # not sent again
    assert b"lost with a replica before" in lost_again["body"]
    proxy.lose = {4}
    assert call(middleware, "POST", "/v1/predict", [b"other"])["status"] == 200  # others are
    assert len(proxy.tries) == 5
