"""The Ray Serve deployment around one EmotionEngine: lifecycle, hot swap, idle release,
queueing, health.

Each variant (base, large, turbo) is its own deployment of this class. Its model settings
arrive as the deployment's user_config:
- the first config is loaded in `reconfigure()` before the replica reports ready, so no load
  ever happens on the request path of a fresh replica;
- a changed config (`serve deploy` of an edited file) is loaded in the background while the
  current model keeps serving, then swapped in with one assignment; requests in flight finish
  on the engine they started with. A load that fails leaves the current model serving and is
  reported in `info()` (`last_swap`);
- with `idle_unload_s`, a model unused that long is released (state `unloaded`) and the next
  request loads it again, waiting for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import gc
import logging
import math
import os
import time
import weakref
from dataclasses import asdict

import numpy as np
from ray import serve

from serve_app.config import ModelSettings
from serve_app.inference.engine import MIN_SAMPLES, EmotionEngine
from serve_app.inference.passes import padded_chunks
from serve_app.metrics import ModelMetrics

logger = logging.getLogger("ray.serve")

IDLE_CHECK_MAX_S = 5.0


class InvalidInput(ValueError):
    """The array handed to the model is not usable (the router should have caught it)."""


def _replica_threads() -> int:
    """Torch threads for this replica: its CPU share rounded up, at most the machine's cores."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, min(os.cpu_count() or 1, math.ceil(cpus)))


def _replica_node() -> dict:
    """The Ray node this replica runs on (on Kubernetes: the pod's IP)."""
    import ray

    return {"id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}


def _replica_device() -> str:
    import torch

    # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave this replica (none: CPU).
    return "cuda" if torch.cuda.is_available() else "cpu"


def _trim_heap() -> None:
    """Hand glibc's free lists back to the OS (freed tensors otherwise stay in the RSS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the allocator keeps what it keeps


def _release_memory() -> None:
    gc.collect()
    _trim_heap()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@serve.deployment(
    max_ongoing_requests=16,
    max_queued_requests=32,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=60,
)
class EmotionModel:
    def __init__(self, variant: str):
        self.variant = variant
        self.target: ModelSettings | None = None    # the config asked for last
        self.settings: ModelSettings | None = None  # the config being served
        self.engine: EmotionEngine | None = None
        self.state = "waiting_for_config"
        self.error: str | None = None
        self.load_count = 0
        self.loaded_at: float | None = None
        self.last_swap: dict | None = None
        self.pid = os.getpid()
        self.node = _replica_node()
        self._in_flight = 0
        self._last_used = time.monotonic()
        self._load_lock = asyncio.Lock()  # one load at a time: swap, or reload after unload
        self._background: set[asyncio.Task] = set()
        self._idle_watch: asyncio.Task | None = None
        self.metrics = ModelMetrics(variant)
        self._batching = False
        self._max_batch_audio_s = 120.0
        self.largest_batch = 0
        # One worker: FunASR's model is not reentrant, so requests queue in front of it.
        self._inference = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{variant}-inference")

    # -- configuration and lifecycle -----------------------------------------------------
    async def reconfigure(self, user_config: dict) -> None:
        settings = ModelSettings.model_validate(user_config)
        # Batching settings apply at once, whatever the model (no reload for them).
        self._batched.set_max_batch_size(settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self._batching = settings.max_batch_size > 1
        self._max_batch_audio_s = settings.max_batch_audio_s
        if settings == self.target:
            return  # Ray may call reconfigure twice with the same config: load once
        self.target = settings
        if self._idle_watch is None:
            self._idle_watch = asyncio.get_running_loop().create_task(self._watch_idle())
        if self.state == "waiting_for_config":
            await self._initial_load(settings)
        elif self.settings is not None and settings.load_key() == self.settings.load_key():
            # Nothing to load (limits, batching, timeline, idle release change live); back to
            # the model being served, a swap still in progress is dropped.
            self.settings = settings
            if self.engine is not None:
                self.engine.settings = settings
        elif self.engine is None:
            self.settings = settings  # unloaded (or failed): the next request loads it
        else:
            task = asyncio.get_running_loop().create_task(self._swap(settings))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _initial_load(self, settings: ModelSettings) -> None:
        self.state = "loading"
        try:
            async with self._load_lock:
                self._install(await asyncio.to_thread(self._build, settings), settings)
        except Exception as exc:
            self.state, self.error = "failed", str(exc)
            self.metrics.load("initial", ok=False)
            logger.error("variant %s: model load failed: %s", self.variant, exc)
            raise
        self.metrics.load("initial", ok=True)

    async def _swap(self, settings: ModelSettings) -> None:
        async with self._load_lock:
            if settings != self.target:
                return  # superseded by a newer config while waiting
            previous = self.engine.identity() if self.engine else None
            started = time.time()
            self.state = "swapping"
            logger.info("variant %s: loading %s in the background", self.variant,
                        settings.source)
            try:
                engine = await asyncio.to_thread(self._build, settings)
            except Exception as exc:
                self.metrics.load("swap", ok=False)
                self.state = "ready" if self.engine else "failed"
                self.last_swap = {"result": "failed", "error": str(exc), "at": time.time(),
                                  "duration_s": round(time.time() - started, 3),
                                  "requested": {"source": settings.source,
                                                "precision": settings.precision},
                                  "serving": previous}
                logger.error("variant %s: swap to %s failed, still serving %s: %s",
                             self.variant, settings.source,
                             previous and previous["source"], exc)
                return
            if settings != self.target:
                # A newer config arrived during the load: its own swap follows, or it was
                # the model already serving.
                self.state = "ready"
                return
            self._install(engine, settings)
            self.metrics.load("swap", ok=True)
            self.last_swap = {"result": "ok", "error": None, "at": time.time(),
                              "duration_s": round(time.time() - started, 3),
                              "from": previous, "to": engine.identity()}

    def _build(self, settings: ModelSettings) -> EmotionEngine:
        """Load and warm up a new engine (in a worker thread; touches no shared state)."""
        engine = EmotionEngine(settings, device=_replica_device(),
                               threads=settings.threads or _replica_threads())
        info = engine.load()
        engine.warmup()
        logger.info("variant %s: loaded %s (%s weights, %s, %s, %d threads) in %.2f s",
                    self.variant, info.source, info.weights, info.device, info.dtype,
                    info.threads, info.load_s)
        return engine

    def _install(self, engine: EmotionEngine, settings: ModelSettings) -> None:
        if self.engine is not None:
            # Requests in flight still hold the old engine: trim once the last one lets go.
            weakref.finalize(self.engine, _trim_heap)
        # One assignment on the event loop: every request sees the old engine or the new one.
        self.engine, self.settings = engine, settings
        self.load_count += 1
        self.loaded_at = time.time()
        self.state, self.error = "ready", None
        self.metrics.set_loaded(True)
        self.metrics.set_backend(engine.info.backend, settings.backend)

    async def _reload(self) -> EmotionEngine:
        """Load the configured model again after an idle unload (the request waits)."""
        async with self._load_lock:
            if self.engine is None:
                self.state = "loading"
                try:
                    self._install(await asyncio.to_thread(self._build, self.settings),
                                  self.settings)
                except Exception as exc:
                    self.state, self.error = "failed", str(exc)
                    self.metrics.load("reload", ok=False)
                    raise
                self.metrics.load("reload", ok=True)
            return self.engine

    async def _watch_idle(self) -> None:
        while True:
            limit = self.settings.idle_unload_s if self.settings else 0
            await asyncio.sleep(min(IDLE_CHECK_MAX_S, limit / 4) if limit else IDLE_CHECK_MAX_S)
            if limit and self.engine is not None and self._in_flight == 0 \
                    and time.monotonic() - self._last_used >= limit:
                await self._unload()

    async def _unload(self) -> None:
        async with self._load_lock:
            if self._in_flight or self.engine is None:
                return  # a request arrived meanwhile: it keeps the model
            engine, self.engine = self.engine, None
            self.state = "unloading"  # "unloaded" once the memory is given back
            self.metrics.set_loaded(False)
            rss_before = _rss_bytes()
            engine.unload()
            del engine
            await asyncio.to_thread(_release_memory)
            self.state = "unloaded"
            logger.info("variant %s: idle for %.0f s, model released (RSS %.0f -> %.0f MB)",
                        self.variant, self.settings.idle_unload_s, rss_before / 2**20,
                        _rss_bytes() / 2**20)

    def check_health(self) -> None:
        if self.engine is None and self.state in ("failed", "waiting_for_config"):
            raise RuntimeError(f"variant {self.variant}: no model loaded ({self.state}: "
                               f"{self.error or 'set this deployment user_config'})")

    def info(self) -> dict:
        engine = self.engine
        model = asdict(engine.info) if engine and engine.info else {}
        return {
            "variant": self.variant,
            "state": self.state,
            "error": self.error,
            "load_count": self.load_count,
            "loaded_at": self.loaded_at,
            "pid": self.pid,
            "node": self.node,
            "rss_bytes": _rss_bytes(),
            "in_flight": self._in_flight,
            "precision": self.settings.precision if self.settings else None,
            "idle_unload_s": self.settings.idle_unload_s if self.settings else None,
            "identity": engine.identity() if engine else None,
            "last_swap": self.last_swap,
            "max_batch_size": self.settings.max_batch_size if self.settings else None,
            "largest_batch": self.largest_batch,
            **{key: model.get(key) for key in ("source", "weights", "device", "dtype",
                                               "threads", "load_s", "backend", "backend_info")},
        }

    # -- inference -----------------------------------------------------------------------
    def _check_waveform(self, waveform: np.ndarray, settings: ModelSettings) -> None:
        if not isinstance(waveform, np.ndarray) or waveform.dtype != np.float32 \
                or waveform.ndim != 1:
            raise InvalidInput("expected a 1-D float32 numpy array at 16 kHz")
        if len(waveform) < MIN_SAMPLES:
            raise InvalidInput(f"at least {MIN_SAMPLES} samples are needed")
        if len(waveform) > settings.max_audio_s * 16_000:
            raise InvalidInput(f"longer than {settings.max_audio_s:g} s")
        if not np.isfinite(waveform).all():
            raise InvalidInput("NaN or infinite samples")

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)
    async def _batched(self, requests: list[tuple]) -> list:
        """Requests gathered by Serve, run as padded batches of the same engine and options,
        each at most max_batch_audio_s of padded audio (serve_app/inference/passes.py); results in
        request order."""
        results: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, (engine, _, granularity, extract) in enumerate(requests):
            groups.setdefault((id(engine), granularity, extract), []).append(index)
        loop = asyncio.get_running_loop()
        max_padded = int(self._max_batch_audio_s * 16_000)
        for indices in groups.values():
            engine, _, granularity, extract = requests[indices[0]]
            lengths = [len(requests[i][1]) for i in indices]
            for positions in padded_chunks(lengths, max_padded):
                chunk = [indices[p] for p in positions]
                waves = [requests[i][1] for i in chunk]
                predictions = await loop.run_in_executor(
                    self._inference, engine.predict_batch, waves, granularity, extract)
                self.metrics.forward(predictions[0].inference_ms, batch_size=len(chunk))
                self.largest_batch = max(self.largest_batch, len(chunk))
                for i, prediction in zip(chunk, predictions):
                    results[i] = prediction
        return results

    async def predict(self, waveform: np.ndarray, granularity: str = "utterance",
                      extract_embedding: bool = False) -> dict:
        arrived = time.perf_counter()
        self._in_flight += 1  # before any await: an idle unload now waits for this request
        self.metrics.set_queue(self._in_flight)
        try:
            engine = self.engine
            if engine is None:
                if self.settings is None:
                    raise RuntimeError(f"variant {self.variant} has no model configured")
                engine = await self._reload()
            self._check_waveform(waveform, engine.settings)
            if self._batching:
                result = await self._batched((engine, waveform, granularity, extract_embedding))
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(
                    self._inference, engine.predict, waveform, granularity, extract_embedding)
                self.metrics.forward(result.inference_ms, batch_size=1)
        finally:
            self._in_flight -= 1
            self.metrics.set_queue(self._in_flight)
            self._last_used = time.monotonic()
        elapsed_ms = (time.perf_counter() - arrived) * 1000
        return {
            "labels": result.labels,
            "scores": result.scores,
            "embedding": result.embedding,
            "timeline": result.timeline,
            "model": {"variant": self.variant, "source": engine.info.source,
                      "weights": engine.info.weights, "dtype": engine.info.dtype,
                      "device": engine.info.device},
            "timings_ms": {"queue": round(elapsed_ms - result.inference_ms, 3),
                           "inference": result.inference_ms},
        }
