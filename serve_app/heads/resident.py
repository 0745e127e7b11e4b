"""The heads a variant replica holds: read on first use from the registry's file, checked
whole (serve_app/heads/headfile.decode), kept by sha256 in a bounded LRU, so thousands of heads
can be registered while a bounded number is resident. A revision's content never changes, so
a resident head is never stale; one deleted from the registry is no longer routed here (the
Router resolves every request) and leaves the LRU in time. No Ray, no torch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from serve_app.heads.headfile import Head, UnknownHead, decode
from serve_app.heads.registry import read_file
from serve_app.wire import HeadRef

# A file read here was checked by the Router when it was stored; this bound only keeps a
# replica from reading something absurd.
MAX_RESIDENT_HEAD_BYTES = 256 * 1024 * 1024


class ResidentHeads:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._heads: OrderedDict[str, Head] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # files read: a cache that misses too often shows here

    def __len__(self) -> int:
        return len(self._heads)

    def resize(self, capacity: int) -> None:
        with self._lock:
            self.capacity = capacity
            self._trim()

    def _trim(self) -> None:
        while len(self._heads) > self.capacity:
            self._heads.popitem(last=False)

    def cached(self, ref: HeadRef) -> Head | None:
        with self._lock:
            head = self._heads.get(ref.sha256)
            if head is not None:
                self._heads.move_to_end(ref.sha256)
            return head

    def get(self, ref: HeadRef) -> Head:
        """The head `ref` names (blocking on a miss: call it from a thread)."""
        head = self.cached(ref)
        if head is not None:
            return head
        head = decode(read_file(ref.uri), MAX_RESIDENT_HEAD_BYTES)
        if head.sha256 != ref.sha256 or head.name != ref.name:
            raise UnknownHead(f"head {ref.name}@{ref.revision} changed since it was routed")
        with self._lock:
            self.loads += 1
            self._heads[ref.sha256] = head
            self._trim()
        return head
