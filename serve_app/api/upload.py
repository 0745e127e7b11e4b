"""Reading an upload route's request (POST /v1/predict, POST /v1/segments): the audio bytes
within the size cap, text files beside it (an RTTM file), and the route's fields, from a
multipart form or a raw body with query parameters. One reader, each route its own `UploadSpec`
(fields declared in serve_app/api/protocol.py, files and limits); its OpenAPI is generated
from the same spec. No decoding here.

The form is parsed as the body arrives, within a cap on the whole body, so a recording is held
once (Starlette spools file parts to disk past 1 MB).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from serve_app.api import protocol
from serve_app.audio.waveform import upload_too_large
from serve_app.errors import ApiError, refuse_unknown
from serve_app.labels import parse_label_set
from serve_app.untrusted import whole_number
from serve_app.wire import Granularity, InferenceOptions

FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields
AUDIO_FIELD = "file"
AUDIO_FORMATS = "wav, flac, ogg, mp3, m4a, mp4/mov/3gp, webm/mkv, aac, wma, amr"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # fullmatch: no trailing newline
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
_URLENCODED = "application/x-www-form-urlencoded"
_FORM_PAIR = re.compile(rb"([A-Za-z_]+)=[\x21-\x7e]*")
SESSION_KEY_HEADER = {"name": "X-Session-Key", "in": "header", "required": False,
                      "schema": {"type": "string"}, "description": "a user or conversation "
                      "id: a weighted alias gives the same key the same variant (see "
                      "GET /v1/rollouts)"}


@dataclass(frozen=True)
class UploadSpec:
    """What an upload route reads: its fields, the audio, and text files beside it."""

    fields: type[BaseModel]             # serve_app/api/protocol.py
    audio: str                          # what the audio is, for the OpenAPI
    texts: dict[str, str] = field(default_factory=dict)  # file part -> its description
    extra_headers: tuple[dict, ...] = ()  # OpenAPI header parameters beyond X-Session-Key
    noun: str = "audio"                 # what the file is, in errors

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.fields.model_fields)

    def openapi(self) -> dict:
        """The route's parameters and request body, generated from its fields."""
        properties = protocol.schema_of(self.fields)["properties"]
        files = {AUDIO_FIELD: {"type": "string", "format": "binary", "description": self.audio},
                 **{name: {"type": "string", "format": "binary", "description": description}
                    for name, description in self.texts.items()}}
        return {
            "parameters": [{"name": name, "in": "query", "required": False, "schema": prop,
                            "description": "with a raw body only: " + prop.get("description",
                                                                               "")}
                           for name, prop in properties.items()]
            + [SESSION_KEY_HEADER, *self.extra_headers],
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": {
                    "type": "object", "required": [AUDIO_FIELD],
                    "properties": {**files, **properties}}},
                "application/octet-stream": {"schema": {
                    "type": "string", "format": "binary",
                    "description": "the audio file's bytes as the body; the fields as query "
                    "parameters"}},
            }},
        }


@dataclass(frozen=True)
class Upload:
    data: bytes              # the audio file's bytes
    params: dict[str, str]   # the fields as sent
    texts: dict[str, bytes]  # the text files sent, by part name


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


def capped_receive(request: Request, limit: int):
    """The request's receive(), refusing (413) a body that passes `limit` bytes: at once when
    its Content-Length says so, else as soon as the bytes that arrived do."""
    if declared_length(request) > limit:
        raise upload_too_large(limit)
    seen = 0

    async def receive() -> dict:
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise upload_too_large(limit)
        return message

    return receive


async def read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    receive, chunks = capped_receive(request, limit), []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
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
    refuse_unknown(form.keys(), fields, "form fields")
    return form


def is_urlencoded_form(data: bytes, fields: tuple[str, ...]) -> bool:
    """Whether a body is a urlencoded form of the route's fields (and so carries no audio),
    rather than audio bytes sent with curl's default content type (`--data-binary @clip.wav`
    says application/x-www-form-urlencoded): audio never parses as `field=value&...`."""
    if len(data) > FORM_OVERHEAD:
        return False
    pairs = data.split(b"&")
    return all((match := _FORM_PAIR.fullmatch(pair)) and match.group(1).decode() in fields
               for pair in pairs)


async def _read_part(part, name: str, limit: int) -> bytes:
    if not isinstance(part, UploadFile):
        raise ApiError(422, "invalid_parameter", f"{name} must be a file")
    data = await part.read(limit + 1)
    if len(data) > limit:
        raise upload_too_large(limit, f"the {name} file")
    return data


async def read_upload(request: Request, spec: UploadSpec, max_bytes: int,
                      max_text_bytes: int = FORM_OVERHEAD) -> Upload:
    """The audio (at most max_bytes), the text files (each at most max_text_bytes) and the
    fields of an upload request: a multipart form, or the raw audio as the body (whatever its
    content type says, unless it is a urlencoded form of the fields: 422 missing_file) with the
    fields as query parameters."""
    params, texts = dict(request.query_params), {}
    fields = (AUDIO_FIELD, *spec.texts, *spec.names)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        receive = capped_receive(request, max_bytes + len(spec.texts) * max_text_bytes
                                 + FORM_OVERHEAD)
        form = await read_form(request, receive, fields, max_files=1 + len(spec.texts),
                               max_part_size=max(FORM_OVERHEAD, max_text_bytes))
        if not isinstance(form.get(AUDIO_FIELD), UploadFile):
            raise ApiError(422, "missing_file", f"send the {spec.noun} in the form field "
                           f"{AUDIO_FIELD!r}")
        data = await _read_part(form[AUDIO_FIELD], spec.noun, max_bytes)
        for name in spec.texts:
            if form.get(name) is not None:
                texts[name] = await _read_part(form[name], name, max_text_bytes)
        params.update({key: value for key, value in form.items() if isinstance(value, str)})
    else:
        data = await read_capped(request, max_bytes)
        if request.headers.get("content-type", "").startswith(_URLENCODED) and \
                is_urlencoded_form(data, spec.names):
            raise ApiError(422, "missing_file", f"send the {spec.noun} as multipart/form-data "
                           f"in the field {AUDIO_FIELD!r}, or as the raw request body (the "
                           "fields as query parameters)")
    refuse_unknown(params, spec.names)
    return Upload(data, params, texts)


def request_id(request) -> str:
    """Serve's request id (the client's X-Request-ID, or one Serve made), so that logs and the
    response's X-Request-ID header agree; a fresh one when it is unsafe as a folder name.
    Takes any Starlette HTTPConnection (a request or a WebSocket)."""
    candidate = request.headers.get("x-request-id", "")
    return candidate if _SAFE_ID.fullmatch(candidate) else uuid.uuid4().hex
