"""Reading a prediction request: the audio bytes within the size cap, and its parameters,
from a multipart form or a raw body with query parameters. No decoding here."""

from __future__ import annotations

import re
import uuid

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from serve_app.audio.waveform import upload_too_large
from serve_app.errors import ApiError
from serve_app.labels import parse_label_set
from serve_app.untrusted import whole_number
from serve_app.wire import Granularity, InferenceOptions

PARAMS = ("model_version", "granularity", "extract_embedding", "labels")
FORM_FIELDS = ("file", *PARAMS)
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # fullmatch: no trailing newline
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}

# The route reads the request itself (a form, or the raw body): its schema is given here.
PARAM_SCHEMAS = {
    "model_version": {"type": "string", "description": "a variant (base, large, turbo) or an "
                      "alias (see GET /v1/models); default: the router's default_version"},
    "granularity": {"type": "string", "enum": [str(g) for g in Granularity],
                    "default": str(InferenceOptions().granularity),
                    "description": "utterance: one embedding; frame: one per 20 ms frame, "
                    "and an emotion timeline"},
    "extract_embedding": {"type": "boolean", "default": False,
                          "description": "include the embedding"},
    "labels": {"type": "string", "description": "a label set: comma-separated label names "
               "(e.g. angry,happy,neutral,sad); the softmax over them alone, the other logits "
               "masked. Default: every label"},
}
PREDICT_OPENAPI = {
    "parameters": [{"name": name, "in": "query", "required": False, "schema": schema,
                    "description": "with a raw body only: " + schema["description"]}
                   for name, schema in PARAM_SCHEMAS.items()] + [
        {"name": "X-Session-Key", "in": "header", "required": False,
         "schema": {"type": "string"}, "description": "a user or conversation id: a weighted "
         "alias gives the same key the same variant (see GET /v1/rollouts)"}],
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "the audio: wav, flac, ogg, mp3, m4a, "
                                    "mp4/mov/3gp, webm/mkv, aac, wma, amr"},
                           **PARAM_SCHEMAS}}},
        "application/octet-stream": {"schema": {
            "type": "string", "format": "binary",
            "description": "the audio file's bytes as the body; the fields as query parameters"}},
    }},
}


def parse_bool(name: str, value: str | None) -> bool:
    text = (value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ApiError(422, "invalid_parameter", f"{name} must be true or false, not {value!r}")


def parse_granularity(value: str | None) -> Granularity:
    if not value:
        return InferenceOptions().granularity
    try:
        return Granularity(value)
    except ValueError:
        raise ApiError(422, "invalid_granularity", f"granularity must be one of "
                       f"{[str(g) for g in Granularity]}, not {value!r}") from None


def parse_options(params: dict[str, str]) -> InferenceOptions:
    """The inference options of a request's parameters (422 for a bad value)."""
    return InferenceOptions(
        granularity=parse_granularity(params.get("granularity")),
        extract_embedding=parse_bool("extract_embedding", params.get("extract_embedding")),
        labels=parse_label_set(params.get("labels")))


def declared_length(request: Request) -> int:
    """The body's Content-Length as declared (0 when absent or not a plain number: then the
    bytes are counted as they arrive)."""
    try:
        return whole_number(request.headers.get("content-length", ""), "Content-Length",
                            2**62)
    except ValueError:
        return 0


async def read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    too_large = upload_too_large(limit)
    if declared_length(request) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: Request, receive, fields: tuple[str, ...], max_files: int,
                    max_part_size: int):
    """The multipart form read through `receive`: 400 when malformed or over Starlette's
    limits, 422 for a field not in `fields`."""
    try:
        form = await Request(request.scope, receive).form(
            max_files=max_files, max_fields=len(fields) - max_files,
            max_part_size=max_part_size)
    except ApiError:
        raise  # from `receive`: the body over its cap
    except (MultiPartException, ValueError, KeyError) as exc:
        raise ApiError(400, "malformed_form", f"the multipart form is malformed: {exc}") from None
    except Exception as exc:  # starlette raises HTTPException for over-limit forms
        raise ApiError(400, "malformed_form",
                       f"the multipart form was refused: {exc}") from None
    unknown = sorted(set(form.keys()) - set(fields))
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown form fields {unknown}; expected "
                       f"{list(fields)}")
    return form


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, dict[str, str]]:
    """(audio bytes, parameters) from a multipart form or a raw body with query parameters."""
    params = dict(request.query_params)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        body = await read_capped(request, max_bytes + _FORM_OVERHEAD)

        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        form = await read_form(request, replay, FORM_FIELDS, max_files=1,
                               max_part_size=_FORM_OVERHEAD)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "missing_file", "send the audio in the form field 'file'")
        data = await upload.read()
        if len(data) > max_bytes:
            raise upload_too_large(max_bytes)
        params.update({key: value for key, value in form.items() if isinstance(value, str)})
    else:
        data = await read_raw(request, max_bytes, PARAMS)
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ApiError(422, "unknown_field",
                       f"unknown parameters {unknown}; expected {list(PARAMS)}")
    return data, params


_URLENCODED = "application/x-www-form-urlencoded"
_FORM_PAIR = re.compile(rb"([A-Za-z_]+)=[\x21-\x7e]*")


def is_urlencoded_form(data: bytes, fields: tuple[str, ...]) -> bool:
    """Whether a body is a urlencoded form of the route's fields (and so carries no audio),
    rather than audio bytes sent with curl's default content type (`--data-binary @clip.wav`
    says application/x-www-form-urlencoded): audio never parses as `field=value&...`."""
    if len(data) > _FORM_OVERHEAD:
        return False
    pairs = data.split(b"&")
    return all((match := _FORM_PAIR.fullmatch(pair)) and match.group(1).decode() in fields
               for pair in pairs)


async def read_raw(request: Request, max_bytes: int, fields: tuple[str, ...]) -> bytes:
    """A raw body: the audio itself, whatever its content type says, unless it is a urlencoded
    form of the fields (422: the audio is missing)."""
    data = await read_capped(request, max_bytes)
    if request.headers.get("content-type", "").startswith(_URLENCODED) and \
            is_urlencoded_form(data, fields):
        raise ApiError(422, "missing_file", "send the audio as multipart/form-data in the field "
                       "'file', or as the raw request body (the fields as query parameters)")
    return data


def request_id(request) -> str:
    """Serve's request id (the client's X-Request-ID, or one Serve made), so that logs and the
    response's X-Request-ID header agree; a fresh one when it is unsafe as a folder name.
    Takes any Starlette HTTPConnection (a request or a WebSocket)."""
    candidate = request.headers.get("x-request-id", "")
    return candidate if _SAFE_ID.fullmatch(candidate) else uuid.uuid4().hex
