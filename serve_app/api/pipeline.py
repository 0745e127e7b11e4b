"""One request pipeline for every prediction route: the steps a protocol adapter calls, so
that each route is parse -> pipeline -> shape, and admission, routing, limits, metrics and the
access log stay one copy. Torch-free, and no web framework beyond a connection's headers.

    async with pipeline.request(connection) as call:   # admits (401/429); logs once at the end
        route = call.resolve(model_version, session_key)  # variant, alias, weighted alias
        options = await call.choose_head(options, head)   # head=NAME[@REV] or a head alias
        audio = await call.decode(data)                   # or call.accept(samples, rate)
        answer = await call.infer(route, audio.waveform, options)  # timeouts, retry, shadow
        return call.respond(JSONResponse(shape(answer)))

Whatever the outcome (an ApiError, a bug, a client error), the request writes exactly one
access-log line (ids, variant, outcome, durations; never audio) and one set of metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import numpy as np
from starlette.responses import Response

from serve_app.api import responses as results
from serve_app.api import upload
from serve_app.api.variant_client import Variants
from serve_app.audio import waveform as audio
from serve_app.audio.pool import Decoder
from serve_app.audio.waveform import DecodedAudio
from serve_app.config import RouterSettings
from serve_app.errors import AccessDenied, ApiError
from serve_app.heads.catalog import HeadCatalog
from serve_app.heads.headfile import InvalidHead, UnknownHead, parse_reference
from serve_app.heads.registry import HeadRegistry
from serve_app.labels import UnknownLabel, select
from serve_app.metrics import RouterMetrics
from serve_app.traffic.access import AccessControl, Admission
from serve_app.traffic.routing import Aliases, Route, RoutingTable
from serve_app.traffic.shadow import Shadow
from serve_app.wire import HeadRef, InferenceOptions, InferenceRequest, VariantAnswer

access_log = logging.getLogger("ray.serve.emotion2vec.access")


HEAD_IN_MODEL_NAME = "+"


def model_and_head(name: str | None) -> tuple[str | None, str | None]:
    """Protocols whose clients name only a model (Hugging Face's URL, KServe v2's model name)
    reach a custom head as VARIANT+HEAD[@REV] ('+HEAD': the default variant): the model_version
    and the head asked for."""
    if name is None or HEAD_IN_MODEL_NAME not in name:
        return name, None
    version, head = name.split(HEAD_IN_MODEL_NAME, 1)
    return version or None, head


class Connection(Protocol):
    """An HTTP request or a WebSocket (Starlette's HTTPConnection): its headers are read."""

    @property
    def headers(self) -> Mapping[str, str]: ...


class Pipeline:
    """The router's parts every route shares, rebuilt from each RouterSettings."""

    def __init__(self, variants: Variants, metrics: RouterMetrics, settings: RouterSettings):
        self.variants = variants
        self.metrics = metrics
        self.settings = settings
        self.access = AccessControl(on_file_state=metrics.key_file_state)
        self.decoder = Decoder(settings.decode_workers)
        self.routes = RoutingTable(settings.default_version, {}, variants.names)
        self.shadow = Shadow(variants, metrics.shadow)
        self.head_routes = Aliases({})
        self.heads = self._catalog(settings)

    async def configure(self, settings: RouterSettings) -> None:
        """Apply a new router config; one the variants cannot serve raises ValueError and
        changes nothing."""
        settings.check_against(self.variants.names)
        self.access.configure(settings)  # a bad key file refuses the whole config
        self.settings = settings
        self.routes = RoutingTable(settings.default_version, settings.aliases,
                                   self.variants.names)
        self.shadow.configure(settings)
        self.head_routes = Aliases(settings.heads.aliases)
        if self._catalog_layout(settings) != self._heads_layout:
            self.heads = self._catalog(settings)
        if settings.decode_workers != self.decoder.workers:
            old, self.decoder = self.decoder, Decoder(settings.decode_workers)
            await old.close()

    @staticmethod
    def _catalog_layout(settings: RouterSettings) -> tuple:
        return settings.heads_dir, settings.heads.max_head_bytes, settings.heads.refresh_s

    def _catalog(self, settings: RouterSettings) -> HeadCatalog:
        """The view of heads_dir, rebuilt (its cache dropped) only when where or how changes."""
        self._heads_layout = self._catalog_layout(settings)
        return HeadCatalog(HeadRegistry(settings.heads_dir, settings.heads.max_head_bytes),
                           settings.heads.refresh_s)

    # -- steps shared with the stream -----------------------------------------------------
    def admit(self, connection: Connection, trace: dict,
              query_api_key: str | None = None, audio: bool = True) -> Admission:
        """The first step of every /v1 route, before anything is read: the caller's key and
        quota (401, 429), counted per key id."""
        try:
            admission = self.access.admit(connection.headers, query_api_key, audio)
        except AccessDenied as exc:
            trace["key"] = exc.key_label
            self.metrics.access(exc.key_label, exc.code)
            raise
        trace["key"] = admission.label
        self.metrics.access(admission.label, "admitted")
        return admission

    def resolve(self, requested: str | None, session_key: str | None = None) -> Route:
        """The route for a requested model_version (None: the default); a session key makes
        a weighted alias's choice sticky."""
        route = self.routes.resolve(requested, session_key)
        if route is None:
            valid = self.routes.names
            raise ApiError(400, "unknown_model_version",
                           f"unknown model_version {requested!r}; valid: {valid}", valid=valid)
        return route

    @staticmethod
    async def heads_io(function, *args):
        """A call that reads or writes heads_dir, in a thread: 404 unknown_head, 422
        invalid_head, 503 heads_unavailable (with Retry-After) while it cannot be used."""
        try:
            return await asyncio.to_thread(function, *args)
        except (UnknownHead, InvalidHead) as exc:
            raise exc.api_error() from None
        except OSError as exc:
            raise ApiError(503, "heads_unavailable", f"cannot use heads_dir: {exc}",
                           headers={"Retry-After": "2"}) from None

    async def head(self, reference: str) -> HeadRef:
        """NAME@REV or NAME (its latest revision) -> the HeadRef a variant reads."""
        ref, _ = await self.heads_io(self.heads.resolve, *parse_reference(reference))
        return ref

    async def check_labels(self, variant: str, requested: tuple[str, ...] | None,
                           head: HeadRef | None) -> None:
        """Refuse a label set that the head (custom, or the variant's own) lacks, before any
        audio arrives."""
        if head is None:
            return await self.variants.check_labels(variant, requested)
        labels = (await self.heads_io(self.heads.metadata, head.name, head.revision))["labels"]
        try:
            select(requested, labels)
        except UnknownLabel as exc:
            raise exc.api_error() from None

    async def choose_head(self, requested: str, session_key: str | None
                          ) -> tuple[HeadRef, str | None]:
        """A request's `head`: a head alias (a canary between revisions: picked by weight,
        sticky per session key) or NAME[@REV]; and the weighted alias that chose, if any."""
        requested = requested.strip()
        routed_by = requested if self.head_routes.is_weighted(requested) else None
        if requested in self.head_routes:
            requested = self.head_routes.pick(requested, session_key)
        return await self.head(requested), routed_by

    def charge_audio(self, admission: Admission, seconds: float) -> None:
        """Decoded audio counts against the key's audio quota."""
        self.access.charge_audio(admission.key_id, seconds)
        self.metrics.key_audio(admission.label, seconds)

    @contextlib.asynccontextmanager
    async def request(self, connection: Connection, query_api_key: str | None = None,
                      kind: str | None = None, audio: bool = True) -> AsyncIterator[Call]:
        """One request: admitted on entry; its access-log line (and, but for a stream, whose
        metrics are its own, the request metrics) written once on exit, whatever happened."""
        call = Call(self, connection, kind)
        try:
            call.admission = self.admit(connection, call.trace, query_api_key, audio)
            yield call
        except ApiError as exc:
            call.status, call.trace["code"] = exc.status, exc.code
            raise
        except BaseException:
            call.status = 500  # a bug, or the client gone (cancelled): never a 2xx
            raise
        finally:
            call.finish()


class Call:
    """One request going through the pipeline: the settings it started with, its trace (the
    access-log line) and its durations."""

    def __init__(self, pipeline: Pipeline, connection: Connection, kind: str | None = None):
        self.pipeline = pipeline
        self.connection = connection
        self.settings = pipeline.settings  # one config for the whole request
        self.started = time.perf_counter()
        self.request_id = upload.request_id(connection)
        self.kind = kind
        self.trace: dict = {"request_id": self.request_id, "key": None, "variant": None}
        if kind:
            self.trace["kind"] = kind
        self.status = 200  # a block that returns answered; respond() records another status
        self.admission: Admission = Admission(None, {})
        self.decode_ms = 0.0
        self.model_ms = 0.0
        self.audio_s = 0.0  # charged to the key
        self._finished = False

    def resolve(self, requested: str | None, session_key: str | None = None) -> Route:
        """The route for a requested model_version; the session key (the one place it is
        read) is the X-Session-Key header, else what the protocol carries instead."""
        route = self.pipeline.resolve(
            requested, self.connection.headers.get("x-session-key") or session_key)
        self.trace.update(variant=route.variant, route=route.name)
        return route

    async def choose_head(self, options: InferenceOptions, requested: str | None,
                          session_key: str | None = None) -> InferenceOptions:
        """`options` with the request's custom head (none asked: unchanged)."""
        if not requested:
            return options
        if not isinstance(requested, str):  # a JSON protocol's parameter
            raise ApiError(422, "invalid_parameter", "head must be a string: NAME[@REV]")
        ref, routed_by = await self.pipeline.choose_head(
            requested, self.connection.headers.get("x-session-key") or session_key)
        self.trace["head"] = f"{ref.name}@{ref.revision}"
        if routed_by:
            self.trace["head_routed_by"] = routed_by
        return dataclasses.replace(options, head=ref)

    async def decode(self, data: bytes, limits: audio.Limits | None = None) -> DecodedAudio:
        """An uploaded file's bytes -> 16 kHz mono, within the router's decode limits (or a
        route's own: POST /v1/segments takes recordings)."""
        started = time.perf_counter()
        decoded = await self.pipeline.decoder.decode(data, limits or self.settings.decode_limits())
        return self._took(decoded, started)

    async def accept(self, samples: np.ndarray, sample_rate: int,
                     fmt: str = "waveform") -> DecodedAudio:
        """Samples that arrived decoded (serve_app.audio.waveform.from_samples): the same
        limits, downmix and resampling as a decoded file."""
        started = time.perf_counter()
        decoded = await asyncio.to_thread(audio.from_samples, samples, sample_rate, fmt,
                                          self.settings.decode_limits())
        return self._took(decoded, started)

    def _took(self, decoded: DecodedAudio, started: float) -> DecodedAudio:
        self.decode_ms += (time.perf_counter() - started) * 1000
        self.trace["decode_ms"] = round(self.decode_ms, 1)
        self.charge(decoded.duration_s)
        return decoded

    def charge(self, seconds: float) -> None:
        """Audio seconds charged to the key (decoded audio; more where a route analyses
        some of it more than once); the access log's audio_s is the request's total."""
        if seconds > 0:
            self.audio_s += seconds
            self.trace["audio_s"] = round(self.audio_s, 3)
            self.pipeline.charge_audio(self.admission, seconds)

    async def infer(self, route: Route, waveform: np.ndarray, options: InferenceOptions,
                    shadow: bool = True) -> VariantAnswer:
        """The route's variant on a 16 kHz waveform (deadline, retry, errors as ApiError);
        then, in the background, the shadow of that variant if one is configured."""
        started = time.perf_counter()
        answer = await self.pipeline.variants.predict(
            route.variant, InferenceRequest(waveform, options), self.settings.model_timeout_s)
        self.model_ms += (time.perf_counter() - started) * 1000
        self.trace["model_ms"] = round(self.model_ms, 1)
        if shadow:
            self.submit_shadows(route.variant, waveform, answer, options.head)
        return answer

    def submit_shadows(self, variant: str, waveform: np.ndarray, answer: VariantAnswer,
                       head: HeadRef | None) -> None:
        """The shadows of the variant, and of the head revision, that answered (background)."""
        pipeline = self.pipeline
        pipeline.shadow.submit(variant, waveform, answer, head)
        if head is not None:
            pipeline.shadow.submit_head(variant, head, waveform, answer, pipeline.head)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def timings_ms(self, answer: VariantAnswer) -> dict:
        """The response's timings_ms: where the time went so far."""
        return {"decode": round(self.decode_ms, 3),
                "queue_and_inference": round(self.model_ms, 3),
                "inference": answer.timings.inference_ms,
                "total": round(self.elapsed_ms(), 3)}

    async def save(self, result: dict, embedding: np.ndarray | None) -> None:
        """Keep the result under output_dir, when one is configured."""
        if self.settings.output_dir:
            await asyncio.to_thread(results.save_result, self.settings.output_dir,
                                    self.request_id, result, embedding)

    def respond(self, response: Response) -> Response:
        """The response, with the key's X-RateLimit-* headers; its status is logged."""
        response.headers.update(self.admission.headers)
        self.status = response.status_code
        return response

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        trace = self.trace
        trace.update(status=self.status, total_ms=round(self.elapsed_ms(), 1))
        access_log.info(json.dumps(trace))
        if self.kind != "stream":
            self.pipeline.metrics.record(trace["variant"], self.status, trace["total_ms"],
                                         trace.get("audio_s"), trace.get("route"))
