"""Requests sent from threads while a test changes the service, and threads that must not fail
in silence. Every outcome is recorded (a status code, or the transport error that took its
place), each thread is bounded in count and time, and an exception raised in a thread is raised
again in the test: a sender that dies can never make "no request failed" pass."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.waiting import eventually

JOIN_MARGIN_S = 10.0  # what a thread may take past its last request's timeout to end


@dataclass(frozen=True)
class Outcome:
    sender: int           # which sender sent it
    number: int           # its place among that sender's requests, from 0
    started: float        # time.monotonic() when it was sent
    ended: float          # ... and when its answer (or error) came
    status: int | None    # the HTTP status; None when the transport failed
    error: str | None     # the transport error (timeout, reset, refused...), if any
    value: Any = None     # what `read` took from a 200 answer; the text of any other
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    def __str__(self) -> str:
        what = self.error or f"{self.status} {str(self.value)[:200]}"
        return f"sender {self.sender} #{self.number} at {self.started:.2f}: {what}"


Request = Callable[[httpx.Client, int, int], httpx.Response]


def post_clip(clip: Path, **fields: str) -> Request:
    """A request for Traffic: this audio file to /v1/predict, with these form fields."""
    return lambda http, _sender, _number: http.post(
        "/v1/predict", files={"file": (clip.name, clip.read_bytes())}, data=fields)


class Traffic:
    """`senders` threads, each with its own HTTP client, calling request(http, sender, number)
    until stop(), `per_sender` requests or `max_s` seconds, whichever comes first.

        with Traffic(url, lambda http, s, n: http.post(...), senders=3) as traffic:
            ...  # change the service
        assert not traffic.failures(), traffic.failures()[:3]

    Leaving the block stops the senders, waits for them (bounded) and raises any exception a
    sender raised: an error in `request` or `read`, or a sender that did not end in time."""

    def __init__(self, base_url: str, request: Request, *, senders: int = 3,
                 per_sender: int = 5000, max_s: float = 120.0, timeout_s: float = 60.0,
                 read: Callable[[httpx.Response], Any] | None = None):
        self.base_url, self.request, self.read = base_url, request, read
        self.per_sender, self.max_s, self.timeout_s = per_sender, max_s, timeout_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True,
                                          name=f"sender-{index}") for index in range(senders)]

    # -- running ----------------------------------------------------------------------------
    def start(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.stop()
        else:  # the test failed already: stop the senders; the test's error is the one to see
            with contextlib.suppress(Exception):
                self.stop()

    def _run(self, sender: int) -> None:
        deadline = time.monotonic() + self.max_s
        try:
            with httpx.Client(base_url=self.base_url, timeout=self.timeout_s) as http:
                for number in range(self.per_sender):
                    if self._stop.is_set() or time.monotonic() >= deadline:
                        return
                    self._send(http, sender, number)
        except BaseException as exc:
            with self._lock:
                self._errors.append(exc)
            self._stop.set()  # the others stop too: the test is failing anyway

    def _send(self, http: httpx.Client, sender: int, number: int) -> None:
        started = time.monotonic()
        try:
            response = self.request(http, sender, number)
        except httpx.TransportError as exc:  # a timeout, a reset, a refused connection
            outcome = Outcome(sender, number, started, time.monotonic(), None,
                              f"{type(exc).__name__}: {exc}")
        else:
            if response.status_code != 200:
                value = response.text[:1000]
            else:  # an error in read (a 200 that is not what it should be) fails the test
                value = self.read(response) if self.read else None
            outcome = Outcome(sender, number, started, time.monotonic(), response.status_code,
                              None, value, response.headers.get("retry-after"))
        with self._lock:
            self.outcomes.append(outcome)

    def stop(self) -> None:
        """Stop sending, wait for the senders, and raise what any of them raised."""
        self._stop.set()
        self.join()

    def join(self) -> None:
        """Wait for the senders to end on their own bounds (or stop()), then raise what any of
        them raised."""
        deadline = time.monotonic() + self.max_s + self.timeout_s + JOIN_MARGIN_S
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.raise_errors()
        stuck = [thread.name for thread in self._threads if thread.is_alive()]
        assert not stuck, f"{stuck} still running past their bounds"

    def raise_errors(self) -> None:
        """Raise the first exception a sender raised, if any (callable while sending)."""
        with self._lock:
            errors = list(self._errors)
        if errors:
            raise errors[0]

    # -- waiting and reading ----------------------------------------------------------------
    def wait_for(self, count: int, since: float = 0.0, timeout_s: float = 60.0,
                 where: Callable[[Outcome], bool] | None = None) -> None:
        """Wait until `count` requests sent after `since` (and, if given, `where` they are)
        have their outcome. An exception in a sender is raised here at once."""
        def done() -> int:
            return sum(1 for outcome in self.since(since) if where is None or where(outcome))

        def answered() -> bool:
            if done() >= count:
                return True
            self.raise_errors()
            return False

        eventually(answered, lambda: f"{count} requests answered ({done()} were)", timeout_s,
                   interval_s=0.05, retry_on=())

    def since(self, started: float) -> list[Outcome]:
        with self._lock:
            return [outcome for outcome in self.outcomes if outcome.started > started]

    def failures(self) -> list[Outcome]:
        """Every request that did not get a 200: other statuses and transport errors."""
        with self._lock:
            return [outcome for outcome in self.outcomes if not outcome.ok]

    def counts(self) -> dict[int | str, int]:
        """How many of each status (transport errors by their name)."""
        counts: dict[int | str, int] = {}
        with self._lock:
            for outcome in self.outcomes:
                key = outcome.status if outcome.error is None else outcome.error.split(":")[0]
                counts[key] = counts.get(key, 0) + 1
        return counts


def in_threads(*calls: Callable[[], Any], timeout_s: float = 120.0) -> list[Any]:
    """Run these calls at once, one thread each; their results, in order. An exception in any
    of them is raised here, and a call still running after timeout_s fails the test."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(index,), daemon=True)
               for index in range(len(calls))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    stuck = sum(thread.is_alive() for thread in threads)
    assert not stuck, f"{stuck} of {len(calls)} calls still running after {timeout_s} s"
    return results


class Background:
    """One call running in a thread while the test goes on: `result()` waits for it (bounded)
    and raises what it raised."""

    def __init__(self, call: Callable[[], Any]):
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self._result = call()
        except BaseException as exc:
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout_s: float = 120.0) -> Any:
        self._thread.join(timeout=timeout_s)
        if self._error is not None:
            raise self._error
        assert not self._thread.is_alive(), f"still running after {timeout_s} s"
        return self._result
