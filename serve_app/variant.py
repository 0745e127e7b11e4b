"""The Ray Serve deployment around one variant's model: a thin shell over ModelLifecycle
(serve_app/inference/lifecycle.py: first load, hot swap, idle release, in-flight counting),
with what is Ray's own: the replica's resources, its health check, and dynamic batching.

Each variant (base, large, turbo) is its own deployment of this class. Its model settings
arrive as the deployment's user_config (`reconfigure()`); the router sends it an
InferenceRequest and gets a VariantAnswer back (serve_app/wire.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import time

from ray import serve

from serve_app.config import MAX_BATCH_SIZE, ModelSettings, default_of
from serve_app.heads.headfile import Head
from serve_app.heads.resident import ResidentHeads
from serve_app.inference.engine import EmotionEngine, Prediction
from serve_app.inference.lifecycle import ModelLifecycle
from serve_app.inference.memory import rss_bytes
from serve_app.inference.passes import padded_chunks
from serve_app.metrics import ModelMetrics
from serve_app.wire import (
    TARGET_SR,
    HeadRef,
    InferenceRequest,
    ModelDescription,
    TimelineWindow,
    Timings,
    VariantAnswer,
    check_waveform,
)

logger = logging.getLogger("ray.serve")


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
        self.pid = os.getpid()
        self.node = _replica_node()
        self.metrics = ModelMetrics(variant)
        self.lifecycle = ModelLifecycle(variant, self._build, metrics=self.metrics)
        self.largest_batch = 0
        self.heads = ResidentHeads(default_of(ModelSettings, "max_resident_heads"))
        # One worker: FunASR's model is not reentrant, so requests queue in front of it.
        self._inference = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{variant}-inference")

    async def reconfigure(self, user_config: dict) -> None:
        settings = ModelSettings.model_validate(user_config)
        # Batching settings apply at once, whatever the model (no reload for them).
        self._batched.set_max_batch_size(settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.heads.resize(settings.max_resident_heads)
        await self.lifecycle.configure(settings)

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

    def check_health(self) -> None:
        problem = self.lifecycle.health_problem()
        if problem:
            raise RuntimeError(problem)

    def info(self) -> dict:
        return {"variant": self.variant, **self.lifecycle.info(), "pid": self.pid,
                "node": self.node, "rss_bytes": rss_bytes(),
                "largest_batch": self.largest_batch,
                "heads": {"resident": len(self.heads), "loads": self.heads.loads}}

    def settings(self) -> dict | None:
        """The user_config this replica serves (or loads next), for a job that loads the same
        model in its own engines (serve_app/jobs/driver.py)."""
        settings = self.lifecycle.settings
        return None if settings is None else settings.model_dump(mode="json")

    # -- inference -----------------------------------------------------------------------
    @serve.batch(max_batch_size=MAX_BATCH_SIZE,
                 batch_wait_timeout_s=default_of(ModelSettings, "batch_wait_timeout_s"))
    async def _batched(self, requests: list[tuple[EmotionEngine, InferenceRequest, Head | None]]
                       ) -> list:
        """Requests gathered by Serve, run as padded batches of the same engine and options,
        each at most max_batch_audio_s of padded audio (serve_app/inference/passes.py); results
        in request order."""
        results: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, (engine, request, _) in enumerate(requests):
            # Label sets and heads apply per clip after pooling: they do not split groups.
            options = request.options
            groups.setdefault((id(engine), options.granularity, options.extract_embedding),
                              []).append(index)
        loop = asyncio.get_running_loop()
        # The newest config's bound, as for the batch size: batching settings apply at once.
        max_padded = int(self.lifecycle.target.max_batch_audio_s * TARGET_SR)
        for indices in groups.values():
            engine, first, _ = requests[indices[0]]
            options = first.options
            lengths = [len(requests[i][1].waveform) for i in indices]
            for positions in padded_chunks(lengths, max_padded):
                chunk = [indices[p] for p in positions]
                waves = [requests[i][1].waveform for i in chunk]
                predictions = await loop.run_in_executor(
                    self._inference, engine.predict_batch, waves, options.granularity,
                    options.extract_embedding, [requests[i][1].options.labels for i in chunk],
                    [requests[i][2] for i in chunk])
                self.metrics.forward(predictions[0].inference_ms, batch_size=len(chunk))
                self.largest_batch = max(self.largest_batch, len(chunk))
                for i, prediction in zip(chunk, predictions):
                    results[i] = prediction
        return results

    async def predict(self, request: InferenceRequest) -> VariantAnswer:
        arrived = time.perf_counter()
        async with self.lifecycle.use() as engine:
            check_waveform(request.waveform, engine.settings.max_audio_s)
            head = await request_head(self.heads, engine, request.options.head)
            # An unknown label or a head for another checkpoint fails alone, not a batch.
            engine.label_set(request.options.labels, head)
            if self.lifecycle.target.max_batch_size > 1:
                prediction = await self._batched((engine, request, head))
            else:
                options = request.options
                prediction = await asyncio.get_running_loop().run_in_executor(
                    self._inference, engine.predict, request.waveform, options.granularity,
                    options.extract_embedding, options.labels, head)
                self.metrics.forward(prediction.inference_ms, batch_size=1)
        return answer(self.variant, engine, prediction, (time.perf_counter() - arrived) * 1000,
                      request.options.head)



async def request_head(heads: ResidentHeads, engine: EmotionEngine,
                       ref: HeadRef | None) -> Head | None:
    """A request's custom head, resident or read now (in a thread), checked against the
    engine's checkpoint (HeadBackboneMismatch)."""
    if ref is None:
        return None
    head = heads.cached(ref) or await asyncio.to_thread(heads.get, ref)
    engine.check_head(head)
    return head


def answer(variant: str, engine: EmotionEngine, prediction: Prediction,
           elapsed_ms: float, head: HeadRef | None = None) -> VariantAnswer:
    """An engine's prediction as the answer a variant sends back (serve_app/wire.py)."""
    info = engine.info
    return VariantAnswer(
        labels=prediction.labels,
        scores=prediction.scores,
        embedding=prediction.embedding,
        timeline=None if prediction.timeline is None else
        [TimelineWindow(**window) for window in prediction.timeline],
        model=ModelDescription(variant=variant, source=info.source,
                               weights=info.weights, dtype=info.dtype, device=info.device),
        timings=Timings(queue_ms=round(elapsed_ms - prediction.inference_ms, 3),
                        inference_ms=prediction.inference_ms),
        logits=prediction.logits,
        sha256=info.sha256,
        head=None if head is None else head.answer(),
    )
