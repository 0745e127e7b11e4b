"""A variant's model over time, with no Ray: what the Serve deployment (serve_app/variant.py)
delegates to. Built around an engine factory `build(settings) -> engine` (run in a worker
thread) and an injectable clock, so that every transition is unit-tested with a fake engine.

    waiting_for_config -> loading -> ready <-> swapping
                             |          |
                           failed       +-> unloading -> unloaded -> loading (next request)

- The first config is loaded inside `configure()`: the replica is ready only once it is.
- A config whose load key changed is loaded in the background while the current engine keeps
  serving, then swapped in with one assignment; requests in flight finish on the engine they
  hold. A newer config supersedes an older load in progress (the latest wins). A failed swap
  keeps the current engine and is reported in `last_swap`.
- A config with the same load key applies live (limits, batching, timeline, idle release);
  the backend is part of the load key.
- The engine picks its backend (serve_app/inference/backends/) and falls back to eager
  torch where the one asked for cannot run; the lifecycle reports the one that runs (metric,
  log line, `info()`), so a fallback is never a failed load.
- Requests hold the engine through `use()`, which counts them in flight; with idle_unload_s
  an engine unused that long, and used by nobody, is released, and the next `use()` loads it
  again (the request waits).
One load path (`_load`) serves the initial load, the swap and the reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from enum import StrEnum
from typing import Any, Protocol

from serve_app.config import ModelSettings
from serve_app.inference import memory

logger = logging.getLogger("ray.serve")

IDLE_CHECK_MAX_S = 5.0  # the idle watch looks at least this often
MODEL_FIELDS = ("source", "weights", "device", "dtype", "threads", "load_s", "backend",
                "backend_info", "labels", "embedding_dim", "parameter_count", "sample_rate",
                "sha256")


class State(StrEnum):
    WAITING_FOR_CONFIG = "waiting_for_config"
    LOADING = "loading"      # the initial load, or a reload after an idle release
    READY = "ready"
    SWAPPING = "swapping"    # ready, and a new config loading beside it
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    FAILED = "failed"


class Engine(Protocol):
    """What the lifecycle needs of an engine (serve_app.inference.engine.EmotionEngine)."""

    settings: ModelSettings
    info: Any  # a dataclass with MODEL_FIELDS (backend: the one that runs)

    def identity(self) -> dict: ...

    def unload(self) -> None: ...


class LoadMetrics(Protocol):
    """serve_app.metrics.ModelMetrics, as far as the lifecycle records it."""

    def load(self, kind: str, ok: bool) -> None: ...

    def set_loaded(self, loaded: bool) -> None: ...

    def set_queue(self, length: int) -> None: ...

    def set_backend(self, backend: str, requested: str) -> None: ...


class _NoMetrics:
    def load(self, kind: str, ok: bool) -> None:
        pass

    def set_loaded(self, loaded: bool) -> None:
        pass

    def set_queue(self, length: int) -> None:
        pass

    def set_backend(self, backend: str, requested: str) -> None:
        pass


class ModelLifecycle:
    def __init__(self, name: str, build: Callable[[ModelSettings], Engine], *,
                 metrics: LoadMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 free_memory: Callable[[], None] = memory.release):
        self.name = name
        self._build = build
        self._metrics = metrics or _NoMetrics()
        self._clock, self._wall_clock, self._free_memory = clock, wall_clock, free_memory
        self.target: ModelSettings | None = None    # the config asked for last
        self.settings: ModelSettings | None = None  # the config served (or to load next)
        self.engine: Engine | None = None
        self.state = State.WAITING_FOR_CONFIG
        self.error: str | None = None
        self.load_count = 0
        self.loaded_at: float | None = None
        self.last_swap: dict | None = None
        self.in_flight = 0
        self._last_used = clock()
        self._lock = asyncio.Lock()  # one load or release at a time
        self._background: set[asyncio.Task] = set()
        self._idle_watch: asyncio.Task | None = None

    # -- configuration ---------------------------------------------------------------------
    async def configure(self, settings: ModelSettings) -> None:
        """Take a new config. The first is loaded before this returns (and a failure raises);
        later ones apply live or swap in the background."""
        if settings == self.target:
            return  # Ray may call reconfigure twice with the same config: load once
        self.target = settings
        if self._idle_watch is None:
            self._idle_watch = asyncio.get_running_loop().create_task(self._watch_idle())
        if self.state == State.WAITING_FOR_CONFIG:
            await self._load(settings, "initial")
        else:
            self._move_to(settings)

    def _move_to(self, settings: ModelSettings) -> None:
        if self.settings is not None and settings.load_key() == self.settings.load_key():
            # Nothing to load: back to the engine being served, a swap in progress is dropped.
            self.settings = settings
            if self.engine is not None:
                self.engine.settings = settings
        elif self.engine is None:
            self.settings = settings  # nothing loaded: the next request loads this one
        else:
            task = asyncio.get_running_loop().create_task(self._load(settings, "swap"))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # -- the one load path -----------------------------------------------------------------
    async def _load(self, settings: ModelSettings, kind: str) -> None:
        """kind: initial (raises on failure), swap (in the background: a failure keeps the
        current engine), reload (after a release, for the waiting request: raises)."""
        async with self._lock:
            if kind == "swap" and settings != self.target:
                return  # superseded by a newer config while waiting for the lock
            if kind == "reload" and self.engine is not None:
                return  # another request reloaded it meanwhile
            previous = self.engine.identity() if self.engine is not None else None
            started = self._clock()
            self.state = State.SWAPPING if kind == "swap" else State.LOADING
            if kind == "swap":
                logger.info("variant %s: loading %s in the background", self.name,
                            settings.source)
            try:
                engine = await asyncio.to_thread(self._build, settings)
            except Exception as exc:
                self._metrics.load(kind, ok=False)
                if kind != "swap":
                    self.state, self.error = State.FAILED, str(exc)
                    logger.error("variant %s: model %s failed: %s", self.name, kind, exc)
                    raise
                self.state = State.READY if self.engine is not None else State.FAILED
                self.last_swap = self._swap_report(started, error=str(exc), serving=previous,
                                                   requested={"source": settings.source,
                                                              "precision": settings.precision})
                logger.error("variant %s: swap to %s failed, still serving %s: %s",
                             self.name, settings.source, previous and previous["source"], exc)
                return
            if kind == "swap" and settings != self.target:
                # A newer config arrived during the load: its own swap follows, or it was
                # the engine already serving.
                self.state = State.READY
                return
            self._install(engine, settings)
            self._metrics.load(kind, ok=True)
            if kind == "swap":
                self.last_swap = self._swap_report(started, error=None,
                                                   **{"from": previous,
                                                      "to": engine.identity()})
        if self.target is not None and self.target != settings:
            self._move_to(self.target)  # a config that arrived during an initial or reload

    def _swap_report(self, started: float, error: str | None, **fields) -> dict:
        return {"result": "failed" if error else "ok", "error": error, "at": self._wall_clock(),
                "duration_s": round(self._clock() - started, 3), **fields}

    def _install(self, engine: Engine, settings: ModelSettings) -> None:
        if self.engine is not None:
            # Requests in flight still hold the old engine: trim once the last one lets go.
            weakref.finalize(self.engine, memory.trim_heap)
        # One assignment on the event loop: every request sees the old engine or the new one.
        self.engine, self.settings = engine, settings
        self.load_count += 1
        self.loaded_at = self._wall_clock()
        self._last_used = self._clock()  # idle is counted from the load: a slow load is no idling
        self.state, self.error = State.READY, None
        self._metrics.set_loaded(True)
        self._metrics.set_backend(engine.info.backend, settings.backend)
        if engine.info.backend != settings.backend:
            note = (engine.info.backend_info or {}).get("note")
            logger.warning("variant %s: backend %s asked for, %s runs (%s)", self.name,
                           settings.backend, engine.info.backend, note)

    # -- requests --------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Engine]:
        """The engine for one request, counted in flight while the block runs; loaded again
        first if it was released."""
        self.in_flight += 1  # before any await: a release now waits for this request
        self._metrics.set_queue(self.in_flight)
        try:
            engine = self.engine
            if engine is None:
                if self.settings is None:
                    raise RuntimeError(f"variant {self.name} has no model configured")
                await self._load(self.settings, "reload")
                engine = self.engine  # this request is counted: no release came between
            yield engine
        finally:
            self.in_flight -= 1
            self._metrics.set_queue(self.in_flight)
            self._last_used = self._clock()

    # -- release ---------------------------------------------------------------------------
    async def release(self) -> bool:
        """Unload the engine now, unless a request holds or waits for it: then False."""
        async with self._lock:
            if self.in_flight or self.engine is None:
                return False
            engine, self.engine = self.engine, None
            self.state = State.UNLOADING  # "unloaded" once the memory is given back
            self._metrics.set_loaded(False)
            rss_before = memory.rss_bytes()
            engine.unload()
            del engine
            await asyncio.to_thread(self._free_memory)
            self.state = State.UNLOADED
            logger.info("variant %s: model released (RSS %.0f -> %.0f MB)", self.name,
                        rss_before / 2**20, memory.rss_bytes() / 2**20)
            return True

    def idle_s(self) -> float:
        return self._clock() - self._last_used

    async def release_if_idle(self) -> bool:
        """Release the engine when idle_unload_s is set and it has been unused that long."""
        limit = self.settings.idle_unload_s if self.settings else 0
        if not limit or self.engine is None or self.in_flight or self.idle_s() < limit:
            return False
        return await self.release()

    async def _watch_idle(self) -> None:
        while True:
            limit = self.settings.idle_unload_s if self.settings else 0
            await asyncio.sleep(min(IDLE_CHECK_MAX_S, limit / 4) if limit else IDLE_CHECK_MAX_S)
            try:
                await self.release_if_idle()
            except Exception:  # the watch outlives one failed release
                logger.exception("variant %s: idle release failed", self.name)

    async def close(self) -> None:
        """Stop the idle watch and the background loads (tests; a replica just exits)."""
        tasks = [*self._background, *([self._idle_watch] if self._idle_watch else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._idle_watch = None

    # -- reporting -------------------------------------------------------------------------
    def health_problem(self) -> str | None:
        """Why this replica cannot serve, or None."""
        if self.engine is None and self.state in (State.FAILED, State.WAITING_FOR_CONFIG):
            return (f"variant {self.name}: no model loaded ({self.state}: "
                    f"{self.error or 'set this deployment user_config'})")
        return None

    def info(self) -> dict:
        """The lifecycle's part of /v1/models."""
        engine, settings = self.engine, self.settings
        model = asdict(engine.info) if engine is not None and engine.info else {}
        return {
            "state": str(self.state),
            "error": self.error,
            "load_count": self.load_count,
            "loaded_at": self.loaded_at,
            "in_flight": self.in_flight,
            "precision": settings.precision if settings else None,
            "idle_unload_s": settings.idle_unload_s if settings else None,
            "identity": engine.identity() if engine is not None else None,
            "last_swap": self.last_swap,
            "max_batch_size": settings.max_batch_size if settings else None,
            **{key: model.get(key) for key in MODEL_FIELDS},
        }
