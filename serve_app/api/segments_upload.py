"""Reading a POST /v1/segments request: the recording, and the segments given with it (a JSON
field, or an RTTM file), from a multipart form, or the raw recording as the body with the
fields as query parameters (JSON segments only: an RTTM file needs the form).

Its limits are its own, not predict's: two files (the recording and the RTTM), a recording
up to max_recording_bytes, and a segments field far larger than predict's 64 KB fields
(2,000 segments are ~140 KB of JSON). The form is parsed as the body arrives, so the
recording is held once (Starlette spools file parts to disk past 1 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import UploadFile

from serve_app.api import upload
from serve_app.errors import ApiError
from serve_app.segments.spec import InvalidSegments

PARAMS = ("model_version", "extract_embedding", "labels", "channels", "segments")
FORM_FIELDS = ("file", "rttm", *PARAMS)
CHANNELS = ("mix", "split")
BYTES_PER_SEGMENT = 256  # generous for a JSON object or an RTTM line
MIN_SEGMENTS_BYTES = 1024 * 1024
_FORM_OVERHEAD = 64 * 1024


_FIELD_SCHEMAS = {
    "model_version": {"type": "string", "description": "a variant or an alias, as for "
                      "POST /v1/predict; default: the router's default_version"},
    "extract_embedding": {"type": "boolean", "default": False,
                          "description": "each segment carries its utterance embedding"},
    "labels": upload.PARAM_SCHEMAS["labels"],
    "channels": {"type": "string", "enum": list(CHANNELS), "default": "mix",
                 "description": "split: score each channel of a multi-channel call on its "
                 "own (speakers ch0, ch1, ...); mix: channels averaged, as predict"},
    "segments": {"type": "string", "description": 'JSON [{"start_s", "end_s", "speaker"}, '
                 "...] (speaker optional); without segments or rttm, VAD finds the speech"},
}
SEGMENTS_OPENAPI = {
    "parameters": [{"name": name, "in": "query", "required": False, "schema": schema,
                    "description": "with a raw body only: " + schema["description"]}
                   for name, schema in _FIELD_SCHEMAS.items()] + [
        {"name": "X-Session-Key", "in": "header", "required": False,
         "schema": {"type": "string"}, "description": "as for POST /v1/predict"},
        {"name": "Accept", "in": "header", "required": False, "schema": {"type": "string"},
         "description": "application/x-ndjson: a line per segment as it finishes, then a "
         "summary line"}],
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "the recording (any format predict takes)"},
                           "rttm": {"type": "string", "format": "binary",
                                    "description": "the turns, as RTTM SPEAKER lines"},
                           **_FIELD_SCHEMAS}}},
        "application/octet-stream": {"schema": {
            "type": "string", "format": "binary",
            "description": "the recording's bytes as the body; the fields as query "
            "parameters"}},
    }},
}


@dataclass(frozen=True)
class SegmentsUpload:
    data: bytes                # the recording's bytes
    params: dict[str, str]     # model_version, extract_embedding, channels (as sent)
    segments: str | None       # the JSON field, as sent
    rttm: str | None           # the RTTM file's text

    @property
    def split(self) -> bool:
        return self.params.get("channels", "mix") == "split"


def segments_bytes_limit(max_segments: int) -> int:
    return max(MIN_SEGMENTS_BYTES, max_segments * BYTES_PER_SEGMENT)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large",
                    f"the upload is larger than the limit of {limit} bytes")


def _capped(request: Request, limit: int):
    """The request's receive(), refusing (413) a body that grows past `limit` bytes."""
    if upload.declared_length(request) > limit:
        raise _too_large(limit)
    seen = 0

    async def receive() -> dict:
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise _too_large(limit)
        return message

    return receive


async def _read_text(part: UploadFile, name: str, limit: int) -> str:
    data = await part.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "payload_too_large", f"the {name} file is larger than {limit} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidSegments(f"the {name} file is not UTF-8 text") from None


async def read_segments_upload(request: Request, max_bytes: int,
                               max_segments: int) -> SegmentsUpload:
    params = dict(request.query_params)
    text_limit = segments_bytes_limit(max_segments)
    rttm = None
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        receive = _capped(request, max_bytes + text_limit * 2 + _FORM_OVERHEAD)
        form = await upload.read_form(request, receive, FORM_FIELDS, max_files=2,
                                      max_part_size=text_limit)
        audio = form.get("file")
        if not isinstance(audio, UploadFile):
            raise ApiError(422, "missing_file", "send the recording in the form field 'file'")
        data = await audio.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise _too_large(max_bytes)
        part = form.get("rttm")
        if part is not None:
            if not isinstance(part, UploadFile):
                raise ApiError(422, "invalid_parameter", "rttm must be a file")
            rttm = await _read_text(part, "rttm", text_limit)
        params.update({key: value for key, value in form.items() if isinstance(value, str)})
    else:
        data = await upload.read_raw(request, max_bytes, PARAMS)
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ApiError(422, "unknown_field",
                       f"unknown parameters {unknown}; expected {list(PARAMS)}")
    if params.get("channels", "mix") not in CHANNELS:
        raise ApiError(422, "invalid_parameter", f"channels must be one of {list(CHANNELS)}, "
                       f"not {params['channels']!r}")
    segments = params.pop("segments", None)
    if segments is not None and rttm is not None:
        raise InvalidSegments("give segments (JSON) or rttm (a file), not both")
    return SegmentsUpload(data, params, segments, rttm)
