"""Hugging Face audio-classification: what `huggingface_hub.InferenceClient.audio_classification`
sends when its `model` is this service's URL, and the list it expects back.

Requests: the audio file's bytes as the body (no parameters), or JSON
`{"inputs": "<base64 audio>", "parameters": {"top_k", "function_to_apply", "labels"}}`; the
parameters may also come as query parameters. Answer: `[{"label", "score"}, ...]`, highest
first, `top_k` long (default: every label of the set). `function_to_apply`: softmax (predict's
scores), sigmoid or none (the head's raw float32 logits). No torch, no Ray: the parsing and
shaping here, and the route (`classify`), a thin adapter over the request pipeline
(serve_app/api/pipeline.py): predict's keys, quotas, routing, limits, log and metrics.
Errors keep the service's shape.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from serve_app.api import protocol, upload
from serve_app.api.app import Parts
from serve_app.api.pipeline import model_and_head
from serve_app.audio.waveform import upload_too_large
from serve_app.errors import ApiError, refuse_unknown
from serve_app.labels import english_name, parse_label_set
from serve_app.untrusted import load_json, whole_number
from serve_app.wire import InferenceOptions

if TYPE_CHECKING:
    from serve_app.api.pipeline import Pipeline

FUNCTIONS = ("softmax", "sigmoid", "none")
MAX_TOP_K = 1000  # far above any head's label count
PARAMETERS = ("top_k", "function_to_apply", "labels")
_JSON_OVERHEAD = 64 * 1024  # the JSON around the base64 audio: keys, parameters


@dataclass(frozen=True)
class HfRequest:
    audio: bytes
    top_k: int | None = None
    function_to_apply: str = "softmax"
    labels: tuple[str, ...] | None = None


def body_limit(max_upload_bytes: int) -> int:
    """The largest body to read: a JSON body holds the audio in base64 (4/3 of its size)."""
    return 4 * math.ceil(max_upload_bytes / 3) + _JSON_OVERHEAD


def is_json(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "application/json"


def _top_k(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = whole_number(value, "top_k", MAX_TOP_K)
        except ValueError:
            pass  # refused below, with the value as sent
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOP_K:
        raise ApiError(422, "invalid_parameter", f"top_k must be a whole number from 1 to "
                       f"{MAX_TOP_K}, not {str(value)[:40]!r}")
    return value


def _function(value) -> str:
    function = "softmax" if value is None else value
    if function not in FUNCTIONS:
        raise ApiError(422, "invalid_parameter",
                       f"function_to_apply must be one of {list(FUNCTIONS)}, not {function!r}")
    return function


def _audio(inputs, max_upload_bytes: int) -> bytes:
    """The base64 `inputs` (a data: URL's payload too) -> the audio file's bytes."""
    if not isinstance(inputs, str) or not inputs:
        raise ApiError(422, "missing_file", 'send the audio as the raw body, or base64 in '
                       '"inputs" of a JSON body')
    if inputs.startswith("data:") and "," in inputs:
        inputs = inputs.split(",", 1)[1]
    try:
        audio = base64.b64decode(inputs, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_base64", '"inputs" is not valid base64') from None
    if len(audio) > max_upload_bytes:
        raise upload_too_large(max_upload_bytes)
    return audio


def parse_request(body: bytes, content_type: str | None, query: Mapping[str, str],
                  max_upload_bytes: int) -> HfRequest:
    """A request's audio and parameters, from a raw or a JSON body and the query string."""
    refuse_unknown(query, PARAMETERS)
    params: dict = dict(query)
    if is_json(content_type):
        try:
            document = load_json(body)
        except ValueError as exc:
            raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise ApiError(422, "invalid_request", 'the JSON body must be an object with '
                           '"inputs" and optional "parameters"')
        refuse_unknown(document, ("inputs", "parameters"), "fields")
        body_params = document.get("parameters") or {}
        if not isinstance(body_params, dict):
            raise ApiError(422, "unknown_field", '"parameters" must be an object')
        refuse_unknown(body_params, PARAMETERS)
        twice = sorted(set(body_params) & set(query))
        if twice:
            raise ApiError(422, "invalid_parameter",
                           f"parameters {twice} given both in the query and the body")
        params.update(body_params)
        audio = _audio(document.get("inputs"), max_upload_bytes)
    else:
        if len(body) > max_upload_bytes:
            raise upload_too_large(max_upload_bytes)
        audio = body
    return HfRequest(audio, _top_k(params.get("top_k")),
                     _function(params.get("function_to_apply")),
                     parse_label_set(params.get("labels")))


def classification(labels: Sequence[str], scores: Sequence[float],
                   logits: Sequence[float] | None, function_to_apply: str = "softmax",
                   top_k: int | None = None) -> list[dict]:
    """`[{"label", "score"}]` highest first (ties in head order), `top_k` long. labels: the
    variant's labels (FunASR's tokens, shown by their English names); scores: the softmax over
    them; logits: the head's raw float32 logits of the same labels."""
    if function_to_apply == "softmax":
        values = [float(score) for score in scores]
    else:
        if logits is None:
            raise ApiError(503, "model_error", "the variant gave no logits; retry",
                           headers={"Retry-After": "1"})
        raw = np.asarray(logits, dtype=np.float32)
        if function_to_apply == "sigmoid":
            with np.errstate(over="ignore"):  # a very negative logit: exp overflows, score 0
                raw = (1.0 / (1.0 + np.exp(-raw.astype(np.float64)))).astype(np.float32)
        values = raw.tolist()
    order = sorted(range(len(values)), key=lambda i: -values[i])
    return [{"label": english_name(labels[i]), "score": values[i]} for i in order[:top_k]]


async def classify(pipeline: Pipeline, request: Request,
                   model_version: str | None = None) -> JSONResponse:
    """POST /v1/audio-classification[/{model_version}]."""
    async with pipeline.request(request) as call:
        model_version, head = model_and_head(model_version)  # VARIANT+HEAD: a custom head
        route = call.resolve(model_version)
        options = await call.choose_head(InferenceOptions(), head)
        content_type = request.headers.get("content-type")
        max_bytes = call.settings.max_upload_bytes
        body = await upload.read_capped(
            request, body_limit(max_bytes) if is_json(content_type) else max_bytes)
        parsed = parse_request(body, content_type, request.query_params, max_bytes)
        decoded = await call.decode(parsed.audio)
        answer = await call.infer(route, decoded.waveform,
                                  dataclasses.replace(options, labels=parsed.labels))
        return call.respond(JSONResponse(classification(
            answer.labels, answer.scores, answer.logits, parsed.function_to_apply,
            parsed.top_k)))


router = APIRouter()
_OPENAPI = {**protocol.json_or_raw_body(protocol.HfRequest, "the audio file's bytes; "
                                        "parameters as query parameters"),
            "parameters": [{"name": name, "in": "query", "required": False, "schema": schema}
                           for name, schema in protocol.schema_of(protocol.HfParameters)[
                               "properties"].items()]}
_RESPONSES = {200: {"model": list[protocol.HfLabel]},
              **protocol.errors(400, 401, 404, 409, 413, 415, 422, 429, 503, 504)}


@router.post("/v1/audio-classification", summary="Hugging Face audio-classification "
             "(InferenceClient.audio_classification), the default version",
             openapi_extra=_OPENAPI, responses=_RESPONSES)
async def hf_classify(request: Request, parts: Parts) -> JSONResponse:
    return await classify(parts.pipeline, request)


@router.post("/v1/audio-classification/{model_version}",
             summary="Hugging Face audio-classification on a variant or alias",
             openapi_extra=_OPENAPI, responses=_RESPONSES)
async def hf_classify_version(request: Request, model_version: str,
                              parts: Parts) -> JSONResponse:
    return await classify(parts.pipeline, request, model_version)
