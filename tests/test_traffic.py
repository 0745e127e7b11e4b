"""tests/traffic.py, the senders the service tests rely on, against a small HTTP server of the
test's own on 127.0.0.1: what a sender raises fails the test, transport errors are recorded
as failures, and senders stay within their bounds."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from serve_app.tools.cluster import free_port
from tests.traffic import Background, Traffic, in_threads


class Server:
    """Answers every GET with the status its path names (/200, /503), after `delay_s`."""

    def __init__(self, delay_s: float = 0.0):
        delay = delay_s

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                time.sleep(delay)
                status = int(self.path.strip("/") or 200)
                self.send_response(status)
                self.send_header("content-length", "2")
                if status == 503:
                    self.send_header("retry-after", "1")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def get(path: str):
    return lambda http, _sender, _number: http.get(path)


def test_statuses_are_recorded_and_counted():
    def request(http, sender, number):
        return http.get("/503" if (sender, number) == (1, 2) else "/200")

    with Server() as server, Traffic(server.url, request, senders=2, per_sender=4,
                                     read=lambda response: response.json()) as traffic:
        traffic.join()
    assert len(traffic.outcomes) == 8 and traffic.counts() == {200: 7, 503: 1}
    (failure,) = traffic.failures()
    assert (failure.sender, failure.number, failure.retry_after) == (1, 2, "1")
    assert all(o.value == {} for o in traffic.outcomes if o.ok)


def test_an_exception_in_a_sender_fails_the_test():
    def broken(http, _sender, number):
        if number == 1:
            raise KeyError("a bug in the request")
        return http.get("/200")

    with Server() as server, pytest.raises(KeyError, match="a bug"), Traffic(
            server.url, broken, senders=2) as traffic:
        traffic.wait_for(10, timeout_s=30)  # raises as soon as a sender failed
    # A 200 that `read` cannot take is a sender's exception too: it fails at the block's end.
    with Server() as server, pytest.raises(ValueError), Traffic(
            server.url, get("/200"), senders=1, per_sender=1,
            read=lambda response: int("not a number")) as traffic:
        traffic.join()


def test_transport_errors_are_failures_not_silence():
    closed = free_port()  # nothing listens there: every connection is refused
    with Traffic(f"http://127.0.0.1:{closed}", get("/200"), senders=2, per_sender=3) as traffic:
        traffic.join()
    assert len(traffic.outcomes) == 6 and len(traffic.failures()) == 6
    assert all(o.status is None and o.error.startswith("ConnectError") for o in traffic.outcomes)
    assert traffic.counts() == {"ConnectError": 6}
    # A request that outlives the client's timeout is one too (a hang, seen).
    with Server(delay_s=2.0) as server, Traffic(server.url, get("/200"), senders=1,
                                                per_sender=1, timeout_s=0.2) as traffic:
        traffic.join()
    assert [o.error.split(":")[0] for o in traffic.outcomes] == ["ReadTimeout"]


def test_senders_stop_on_their_bounds():
    with Server(delay_s=0.05) as server:
        started = time.monotonic()
        with Traffic(server.url, get("/200"), senders=2, max_s=1.5) as traffic:
            traffic.join()  # ends on max_s: no stop() needed
        assert time.monotonic() - started < 1.5 + 5
        assert traffic.outcomes and all(o.started < started + 1.6 for o in traffic.outcomes)
        with Traffic(server.url, get("/200"), senders=3, per_sender=2) as traffic:
            traffic.join()
        assert sorted((o.sender, o.number) for o in traffic.outcomes) == [
            (s, n) for s in range(3) for n in range(2)]


def test_threads_and_background_calls_raise_what_they_raised():
    assert in_threads(lambda: 1, lambda: 2, timeout_s=10) == [1, 2]
    with pytest.raises(ZeroDivisionError):
        in_threads(lambda: 1, lambda: 1 / 0, timeout_s=10)
    with pytest.raises(AssertionError, match="still running"):
        in_threads(lambda: time.sleep(1.0), timeout_s=0.1)
    background = Background(lambda: httpx.get("http://127.0.0.1:1/", timeout=1))
    with pytest.raises(httpx.ConnectError):
        background.result(timeout_s=10)
