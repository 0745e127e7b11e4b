"""The service's own metrics, exported through Ray (`ray.serve.metrics`): they appear on each
node's Prometheus endpoint as `ray_<name>` and in the Ray dashboard's metrics views. Serve
adds the deployment, replica and application tags itself."""

from __future__ import annotations

import threading
import time
import weakref

import ray
from ray.serve import metrics

_LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
_SCORE_DIFF = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]


class HeldGauge:
    """A gauge whose values are recorded again every few seconds. Ray 2.60's metrics agent
    drops a gauge series that no export refreshed within two report intervals, and a worker
    exports only the values recorded since its last export: a value set once (a model loaded
    an hour ago) would leave Prometheus seconds later."""

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]) -> None:
        self._gauge = metrics.Gauge(name, description=description, tag_keys=tag_keys)
        self._values: dict[tuple, float] = {}
        self._lock = threading.Lock()
        _refresher.hold(self)

    def set(self, value: float, tags: dict[str, str]) -> None:
        with self._lock:
            self._values[tuple(sorted(tags.items()))] = value
            self._gauge.set(value, tags=tags)

    def refresh(self) -> None:
        with self._lock:
            for tags, value in self._values.items():
                self._gauge.set(value, tags=dict(tags))


class _Refresher:
    """One daemon thread per process, re-recording every live HeldGauge at half Ray's report
    interval (so each export carries every value even when one runs late)."""

    def __init__(self) -> None:
        self._gauges: weakref.WeakSet[HeldGauge] = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def hold(self, gauge: HeldGauge) -> None:
        with self._lock:
            self._gauges.add(gauge)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gauge-refresh",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            period_s = max(0.5, ray._config.metrics_report_interval_ms() / 2000)
        except Exception:  # outside a Ray worker: Ray's default interval, 10 s
            period_s = 5.0
        while True:
            time.sleep(period_s)
            with self._lock:
                gauges = list(self._gauges)
            for gauge in gauges:
                gauge.refresh()


_refresher = _Refresher()


class RouterMetrics:
    """Recorded by the router: once per HTTP request, and once per shadow call."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "emotion2vec_requests_total", description="Prediction requests by route (the "
            "alias or variant asked for), variant and outcome (status class: 2xx, 4xx, 5xx)",
            tag_keys=("route", "variant", "outcome"))
        self.latency = metrics.Histogram(
            "emotion2vec_request_latency_ms", description="End-to-end latency in the router",
            boundaries=_LATENCY_MS, tag_keys=("variant",))
        self.audio_seconds = metrics.Counter(
            "emotion2vec_audio_seconds_total", description="Seconds of audio processed",
            tag_keys=("variant",))
        # Per API key id (bounded by the config; refused keys count as "invalid", and all
        # requests as "anonymous" while access control is off).
        self.key_requests = metrics.Counter(
            "emotion2vec_key_requests_total", description="API requests by key id and outcome "
            "(admitted, unauthorized, rate_limited)", tag_keys=("key", "outcome"))
        self.key_audio_seconds = metrics.Counter(
            "emotion2vec_key_audio_seconds_total", description="Seconds of audio charged to "
            "each key id", tag_keys=("key",))
        self.key_file = HeldGauge(
            "emotion2vec_api_keys_file", description="1 for the key file's state: ok, missing "
            "(its keys revoked), invalid (the last good keys in force), none (no key file)",
            tag_keys=("state",))
        self.shadow_requests = metrics.Counter(
            "emotion2vec_shadow_requests_total", description="Shadow calls by primary, target "
            "and outcome (agree, disagree: top-1 compared; error; dropped: too many pending)",
            tag_keys=("primary", "target", "outcome"))
        self.shadow_diff = metrics.Histogram(
            "emotion2vec_shadow_score_diff", description="Largest absolute score difference "
            "between primary and shadow, per comparison", boundaries=_SCORE_DIFF,
            tag_keys=("primary", "target"))

    def record(self, variant: str | None, status: int, latency_ms: float,
               audio_s: float | None, route: str | None = None) -> None:
        name = variant or "none"
        self.requests.inc(tags={"route": route or "none", "variant": name,
                                "outcome": f"{status // 100}xx"})
        self.latency.observe(latency_ms, tags={"variant": name})
        if audio_s and status < 300:
            self.audio_seconds.inc(audio_s, tags={"variant": name})

    def access(self, key: str, outcome: str) -> None:
        self.key_requests.inc(tags={"key": key, "outcome": outcome})

    def key_audio(self, key: str, audio_s: float) -> None:
        self.key_audio_seconds.inc(audio_s, tags={"key": key})

    def key_file_state(self, state: str) -> None:
        for name in ("ok", "missing", "invalid", "none"):
            self.key_file.set(float(name == state), tags={"state": name})

    def shadow(self, primary: str, target: str, outcome: str, max_abs_diff: float | None) -> None:
        tags = {"primary": primary, "target": target}
        self.shadow_requests.inc(tags={**tags, "outcome": outcome})
        if max_abs_diff is not None:
            self.shadow_diff.observe(max_abs_diff, tags=tags)


class ModelMetrics:
    """Recorded by a variant's replica."""

    def __init__(self, variant: str) -> None:
        self.tags = {"variant": variant}
        self.inference = metrics.Histogram(
            "emotion2vec_inference_latency_ms", description="Model forward time per batch",
            boundaries=_LATENCY_MS, tag_keys=("variant",))
        self.batch_size = metrics.Histogram(
            "emotion2vec_batch_size", description="Clips per forward pass",
            boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("variant",))
        self.loads = metrics.Counter(
            "emotion2vec_model_loads_total", description="Model loads by kind "
            "(initial, swap, reload) and result (ok, failed)",
            tag_keys=("variant", "kind", "result"))
        self.loaded = HeldGauge(
            "emotion2vec_model_loaded", description="1 while this replica holds a model",
            tag_keys=("variant",))
        self.queue = HeldGauge(
            "emotion2vec_queue_length", description="Requests in this replica waiting for or "
            "running on the model", tag_keys=("variant",))
        self.backend = HeldGauge(
            "emotion2vec_backend", description="1 for the backend that runs this replica's "
            "encoder (backend) and the one configured (requested); they differ after a fallback",
            tag_keys=("variant", "backend", "requested"))
        self._backend_tags: dict | None = None

    def load(self, kind: str, ok: bool) -> None:
        self.loads.inc(tags={**self.tags, "kind": kind, "result": "ok" if ok else "failed"})

    def set_loaded(self, loaded: bool) -> None:
        self.loaded.set(1 if loaded else 0, tags=self.tags)

    def set_backend(self, backend: str, requested: str) -> None:
        if self._backend_tags is not None:
            self.backend.set(0, tags=self._backend_tags)
        self._backend_tags = {**self.tags, "backend": backend, "requested": requested}
        self.backend.set(1, tags=self._backend_tags)

    def set_queue(self, length: int) -> None:
        self.queue.set(length, tags=self.tags)

    def forward(self, latency_ms: float, batch_size: int) -> None:
        self.inference.observe(latency_ms, tags=self.tags)
        self.batch_size.observe(batch_size, tags=self.tags)


class StreamMetrics:
    """Recorded by the router for WS /v1/stream."""

    def __init__(self) -> None:
        self.active = HeldGauge(
            "emotion2vec_streams_active", description="Open streams in this router replica",
            tag_keys=("variant",))
        self.audio_seconds = metrics.Counter(
            "emotion2vec_stream_audio_seconds_total", description="Seconds of audio received "
            "on streams", tag_keys=("variant",))
        self.lag = metrics.Histogram(
            "emotion2vec_stream_event_lag_ms", description="From a window's last sample "
            "arriving in the router to its event leaving", boundaries=_LATENCY_MS,
            tag_keys=("variant",))
        self.silent_windows = metrics.Counter(
            "emotion2vec_stream_silent_windows_total", description="Windows of vad=true streams "
            "sent without scores: the VAD found no speech in them", tag_keys=("variant",))

    def set_active(self, variant: str, count: int) -> None:
        self.active.set(count, tags={"variant": variant})

    def streamed(self, variant: str, seconds: float) -> None:
        self.audio_seconds.inc(seconds, tags={"variant": variant})

    def event_lag(self, variant: str, lag_ms: float) -> None:
        self.lag.observe(lag_ms, tags={"variant": variant})

    def silent_window(self, variant: str) -> None:
        self.silent_windows.inc(tags={"variant": variant})


class SegmentMetrics:
    """Recorded by the router for POST /v1/segments (its requests also count in
    RouterMetrics, as every request does) and for the stream's utterance events."""

    def __init__(self) -> None:
        self.recordings = metrics.Counter(
            "emotion2vec_recordings_total", description="Recordings segmented, by variant, "
            "segmentation (vad, given) and outcome (ok, or the error code)",
            tag_keys=("variant", "segmentation", "outcome"))
        self.segments = metrics.Counter(
            "emotion2vec_segments_total", description="Segments scored (recordings and "
            "streams' utterances)", tag_keys=("variant", "segmentation"))
        self.audio_seconds = metrics.Counter(
            "emotion2vec_segmented_audio_seconds_total", description="Seconds of recordings "
            "segmented", tag_keys=("variant",))
        self.vad_latency = metrics.Histogram(
            "emotion2vec_vad_latency_ms", description="VAD time per call (a recording, a "
            "channel of one, or a stream's open region)", boundaries=_LATENCY_MS)
        self.active = metrics.Gauge(
            "emotion2vec_recordings_active", description="Recordings in progress in this "
            "router replica")

    def recording(self, variant: str, segmentation: str, outcome: str, audio_s: float) -> None:
        self.recordings.inc(tags={"variant": variant, "segmentation": segmentation,
                                  "outcome": outcome})
        if outcome == "ok":
            self.audio_seconds.inc(audio_s, tags={"variant": variant})

    def scored(self, variant: str, segmentation: str, count: int = 1) -> None:
        self.segments.inc(count, tags={"variant": variant, "segmentation": segmentation})

    def vad(self, latency_ms: float) -> None:
        self.vad_latency.observe(latency_ms)

    def set_active(self, count: int) -> None:
        self.active.set(count)
