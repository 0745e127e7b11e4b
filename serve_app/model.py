"""The Ray Serve deployment around one EmotionEngine: lifecycle, queueing, health.

Each variant (base, large, turbo) is its own deployment of this class. The model settings
arrive as the deployment's user_config: Ray calls `reconfigure()` before the replica
reports ready, so the first load happens at replica start, never on the request path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import time
from dataclasses import asdict

import numpy as np
from ray import serve

from serve_app.config import ModelSettings
from serve_app.engine import MIN_SAMPLES, EmotionEngine

logger = logging.getLogger("ray.serve")


class InvalidInput(ValueError):
    """The array handed to the model is not usable (the router should have caught it)."""


def _replica_threads() -> int:
    """Torch threads for this replica: its CPU share rounded up, at most the machine's cores."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, min(os.cpu_count() or 1, math.ceil(cpus)))


def _replica_device() -> str:
    import torch

    # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave this replica (none: CPU).
    return "cuda" if torch.cuda.is_available() else "cpu"


@serve.deployment(
    max_ongoing_requests=64,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=60,
)
class EmotionModel:
    def __init__(self, variant: str):
        self.variant = variant
        self.settings: ModelSettings | None = None
        self.engine: EmotionEngine | None = None
        self.state = "waiting_for_config"
        self.error: str | None = None
        self.load_count = 0
        self.loaded_at: float | None = None
        self.pid = os.getpid()
        # One worker: FunASR's model is not reentrant, so requests queue in front of it.
        self._inference = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{variant}-inference")

    async def reconfigure(self, user_config: dict) -> None:
        settings = ModelSettings.model_validate(user_config)
        if settings == self.settings and self.engine is not None:
            return  # Ray may call reconfigure twice with the same config: load once
        self.state = "loading"
        try:
            engine = await asyncio.to_thread(self._load, settings)
        except Exception as exc:
            self.state, self.error = "failed", str(exc)
            logger.error("variant %s: model load failed: %s", self.variant, exc)
            raise
        self.engine, self.settings = engine, settings
        self.state, self.error = "ready", None

    def _load(self, settings: ModelSettings) -> EmotionEngine:
        engine = EmotionEngine(settings, device=_replica_device(),
                               threads=settings.threads or _replica_threads())
        info = engine.load()
        engine.warmup()
        self.load_count += 1
        self.loaded_at = time.time()
        logger.info("variant %s: loaded %s (%s weights, %s, %s, %d threads) in %.2f s",
                    self.variant, info.source, info.weights, info.device, info.dtype,
                    info.threads, info.load_s)
        return engine

    def check_health(self) -> None:
        if self.engine is None:
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
            "precision": self.settings.precision if self.settings else None,
            **{key: model.get(key) for key in ("source", "weights", "device", "dtype",
                                               "threads", "load_s")},
        }

    def _check_waveform(self, waveform: np.ndarray) -> None:
        if not isinstance(waveform, np.ndarray) or waveform.dtype != np.float32 \
                or waveform.ndim != 1:
            raise InvalidInput("expected a 1-D float32 numpy array at 16 kHz")
        if len(waveform) < MIN_SAMPLES:
            raise InvalidInput(f"at least {MIN_SAMPLES} samples are needed")
        if len(waveform) > self.settings.max_audio_s * 16_000:
            raise InvalidInput(f"longer than {self.settings.max_audio_s:g} s")
        if not np.isfinite(waveform).all():
            raise InvalidInput("NaN or infinite samples")

    async def predict(self, waveform: np.ndarray, granularity: str = "utterance",
                      extract_embedding: bool = False) -> dict:
        arrived = time.perf_counter()
        engine = self.engine
        if engine is None:
            raise RuntimeError(f"variant {self.variant} has no model loaded")
        self._check_waveform(waveform)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self._inference, engine.predict, waveform, granularity, extract_embedding)
        elapsed_ms = (time.perf_counter() - arrived) * 1000
        return {
            "labels": result.labels,
            "scores": result.scores,
            "embedding": result.embedding,
            "model": {"variant": self.variant, "source": engine.info.source,
                      "weights": engine.info.weights, "dtype": engine.info.dtype,
                      "device": engine.info.device},
            "timings_ms": {"queue": round(elapsed_ms - result.inference_ms, 3),
                           "inference": result.inference_ms},
        }
