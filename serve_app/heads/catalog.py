"""The Router's view of the registry: `head=NAME[@REV]` -> one revision (serve_app/wire.HeadRef),
with what it reads kept for `refresh_s`, so a request costs no listing and a head registered
or deleted elsewhere is seen within refresh_s (a deleted head then answers 404 unknown_head).
Blocking filesystem calls: the Router runs them in a thread. No Ray, no torch.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from serve_app.heads.registry import HeadRegistry, pick_revision
from serve_app.wire import HeadRef

MAX_CACHED_HEADERS = 4096


class HeadCatalog:
    def __init__(self, registry: HeadRegistry, refresh_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.registry = registry
        self.refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._revisions: dict[str, tuple[float, list[int]]] = {}
        self._metadata: OrderedDict[tuple[str, int], dict] = OrderedDict()

    def revisions(self, name: str) -> list[int]:
        now = self._clock()
        with self._lock:
            cached = self._revisions.get(name)
        if cached is not None and now - cached[0] < self.refresh_s:
            return cached[1]
        live = self.registry.revisions(name)
        with self._lock:
            if len(self._revisions) >= MAX_CACHED_HEADERS:
                self._revisions.clear()
            self._revisions[name] = (now, live)
        return live

    def forget(self, name: str) -> None:
        """After this replica wrote or deleted `name`: its next request reads again."""
        with self._lock:
            self._revisions.pop(name, None)

    def metadata(self, name: str, revision: int) -> dict:
        key = (name, revision)
        with self._lock:
            if key in self._metadata:
                self._metadata.move_to_end(key)
                return self._metadata[key]
        meta = self.registry.metadata(name, revision)  # a revision's file never changes
        with self._lock:
            self._metadata[key] = meta
            while len(self._metadata) > MAX_CACHED_HEADERS:
                self._metadata.popitem(last=False)
        return meta

    def resolve(self, name: str, revision: int | None) -> tuple[HeadRef, dict]:
        """The revision a reference means (the latest when None), and its metadata;
        UnknownHead when there is none."""
        revision = pick_revision(name, revision, self.revisions(name))
        meta = self.metadata(name, revision)
        return HeadRef(name, revision, meta["sha256"], self.registry.uri(name, revision)), meta
