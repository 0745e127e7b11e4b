"""The ingress's request pipeline in this test process, with no Ray: each variant a real
EmotionEngine on a tiny generated checkpoint behind the same ModelLifecycle the Serve
deployment uses, offered to the pipeline in a DeploymentHandle's shape
(`handle.predict.remote(request)` is awaitable and cancellable). Routes that take a Starlette
Request are called with one built from an ASGI scope and body."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

from fastapi import FastAPI
from ray.exceptions import RayTaskError
from starlette.requests import Request

from serve_app.api.app import Services, build_api
from serve_app.api.pipeline import Pipeline
from serve_app.api.variant_client import Variants
from serve_app.checkpoints.generate import write_checkpoint
from serve_app.config import ModelSettings, RouterSettings
from serve_app.heads.resident import ResidentHeads
from serve_app.inference.engine import EmotionEngine
from serve_app.inference.lifecycle import ModelLifecycle
from serve_app.metrics import RouterMetrics
from serve_app.variant import answer, request_head
from serve_app.wire import InferenceRequest, VariantAnswer, check_waveform


class _Method:
    def __init__(self, function: Callable):
        self._function = function

    def remote(self, *args) -> asyncio.Future:
        return asyncio.ensure_future(self._function(*args))


class LocalVariant:
    """One variant served in this process, one request at a time (as a replica's worker)."""

    def __init__(self, name: str, settings: ModelSettings):
        self.name, self.settings = name, settings
        self.lifecycle = ModelLifecycle(name, self._build)
        self.heads = ResidentHeads(settings.max_resident_heads)
        self._one = asyncio.Lock()
        self.predict, self.info = _Method(self._predict), _Method(self._info)

    @staticmethod
    def _build(settings: ModelSettings) -> EmotionEngine:
        engine = EmotionEngine(settings, device="cpu", threads=1)
        engine.load()
        return engine

    async def _predict(self, request: InferenceRequest) -> VariantAnswer:
        arrived = time.perf_counter()
        try:
            async with self.lifecycle.use() as engine, self._one:
                check_waveform(request.waveform, engine.settings.max_audio_s)
                options = request.options
                head = await request_head(self.heads, engine, options.head)
                engine.label_set(options.labels, head)
                prediction = await asyncio.to_thread(
                    engine.predict, request.waveform, options.granularity,
                    options.extract_embedding, options.labels, head)
        except Exception as exc:  # as a handle delivers a replica's exception
            raise RayTaskError("predict", traceback.format_exc(), exc) from None
        return answer(self.name, engine, prediction, (time.perf_counter() - arrived) * 1000,
                      options.head)

    async def _info(self) -> dict:
        return {"variant": self.name, **self.lifecycle.info()}


def tiny_checkpoint(root: Path) -> Path:
    directory = root / "tiny"
    write_checkpoint(directory, "tiny", seed=0)
    return directory


async def local_pipeline(checkpoint: Path, settings: RouterSettings | None = None,
                         names: tuple[str, ...] = ("base",)) -> Pipeline:
    """A Pipeline over LocalVariants of one tiny checkpoint, configured with `settings`."""
    handles = {}
    for name in names:
        handles[name] = LocalVariant(name, ModelSettings(source=str(checkpoint)))
        await handles[name].lifecycle.configure(handles[name].settings)
    settings = settings or RouterSettings(default_version=names[0])
    pipeline = Pipeline(Variants(handles), RouterMetrics(), settings)
    await pipeline.configure(settings)
    return pipeline


@contextlib.contextmanager
def local_service(checkpoint: Path, settings: RouterSettings | None = None,
                  names: tuple[str, ...] = ("base",)) -> Iterator[tuple[Pipeline, FastAPI]]:
    """A pipeline and the app over it, made and closed on one event loop of their own (the
    app itself runs on whatever loop its client brings)."""
    loop = asyncio.new_event_loop()
    pipeline = loop.run_until_complete(local_pipeline(checkpoint, settings, names))
    try:
        yield pipeline, local_app(pipeline)
    finally:
        loop.run_until_complete(close_pipeline(pipeline))
        loop.close()


def local_app(pipeline: Pipeline, vad=None) -> FastAPI:
    """The service's whole HTTP app over a local pipeline, as the Router builds it."""
    return build_api(Services.create(pipeline, vad))


async def close_pipeline(pipeline: Pipeline) -> None:
    for handle in pipeline.variants.handles.values():
        await handle.lifecycle.close()
    await pipeline.decoder.close()


def request(path: str, body: bytes = b"", *, method: str = "POST",
            headers: dict[str, str] | None = None, query: dict | None = None) -> Request:
    """A Starlette Request for an in-process route call: the body arrives in one message."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)  # the client waits for the answer
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                   for k, v in {"content-length": str(len(body)), **(headers or {})}.items()]
    scope = {"type": "http", "method": method, "path": path, "root_path": "",
             "query_string": urlencode(query or {}).encode(), "headers": raw_headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "scheme": "http"}
    return Request(scope, receive)


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type."""
    boundary = "inprocess-boundary-7d1f"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                     f"{value}\r\n".encode())
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                     f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     .encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def body_of(response) -> dict:
    return json.loads(response.body)
