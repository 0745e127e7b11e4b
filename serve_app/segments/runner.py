"""Scoring a recording's segments with a bounded number in flight, and the cap on recordings
a router replica works on at once. Plain asyncio: the route hands in how one segment is
scored (a variant call through the request pipeline)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

from serve_app.errors import ApiError
from serve_app.segments.spec import Span

T = TypeVar("T")
RECORDINGS_RETRY_AFTER_S = 5


class RecordingSlots:
    """Recordings in progress on this router replica; beyond the limit, 503 at once."""

    def __init__(self, on_change: Callable[[int], None] = lambda active: None) -> None:
        self.active = 0
        self.on_change = on_change  # the gauge

    @contextlib.contextmanager
    def hold(self, limit: int) -> Iterator[None]:
        if self.active >= limit:
            raise ApiError(503, "too_many_recordings",
                           f"this router replica is working on {limit} recordings; retry later",
                           headers={"Retry-After": str(RECORDINGS_RETRY_AFTER_S)})
        self.active += 1
        self.on_change(self.active)
        try:
            yield
        finally:
            self.active -= 1
            self.on_change(self.active)


async def score_all(spans: list[Span], score: Callable[[Span], Awaitable[T]],
                    in_flight: int) -> AsyncIterator[tuple[int, T]]:
    """(index into spans, result) as each segment finishes, at most `in_flight` at once, in
    start order of submission. The first failure cancels the segments still running and is
    raised: a recording is answered whole or not at all."""
    pending: dict[asyncio.Task, int] = {}
    queue = iter(enumerate(spans))
    try:
        while True:
            while len(pending) < in_flight:
                item = next(queue, None)
                if item is None:
                    break
                index, span = item
                pending[asyncio.ensure_future(score(span))] = index
            if not pending:
                return
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            # Done tasks in submission order: a result that finished with others is not
            # reported before an earlier one.
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                yield index, task.result()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
