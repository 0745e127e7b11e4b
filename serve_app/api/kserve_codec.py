"""KServe's Open Inference Protocol v2 (REST) on the wire: requests and responses as JSON
tensors or with the binary tensor extension, the metadata documents and the error shape. No
Ray, no torch; the routes (serve_app/api/kserve.py) run the same request pipeline as predict.

Binary tensor extension (what `tritonclient.http` sends by default): the body is a JSON header of
`Inference-Header-Content-Length` bytes, then each binary tensor's bytes in input order (its
`parameters.binary_data_size`). FP32 is little-endian float32, row-major; a BYTES element is a
4-byte little-endian length, then its bytes. In JSON a BYTES element is a string: here the audio
file's base64.

This model: input `audio` BYTES [1] (an encoded file, any format predict takes) or `waveform`
FP32 [n] / [1, n] (16 kHz mono samples); parameters `granularity`, `labels`, `head`; outputs
`scores` FP32 [N], `labels` BYTES [N], `emotion` BYTES [1], and `embedding` FP32 [frames, D]
(one frame for granularity=utterance) only when asked for.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

from serve_app.audio.waveform import upload_too_large
from serve_app.errors import ApiError
from serve_app.untrusted import load_json, whole_number

HEADER_LENGTH = "inference-header-content-length"
BINARY_CONTENT_TYPE = "application/octet-stream"
INPUTS = {"audio": "BYTES", "waveform": "FP32"}
OUTPUTS = {"scores": "FP32", "labels": "BYTES", "emotion": "BYTES", "embedding": "FP32"}
DEFAULT_OUTPUTS = ("scores", "labels", "emotion")
PARAMETERS = ("granularity", "labels", "binary_data_output", "head")
VERSION_DIGITS = 12      # a model's version: the first hex digits of its checkpoint's sha256
HEADER_OVERHEAD = 64 * 1024  # the JSON header beside binary tensors
MAX_ELEMENTS = 1 << 26   # no tensor here is larger; bounds a shape's product before any use
MAX_DIMS = 8             # this model's tensors have one or two


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_tensor", message)


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]  # FP32: float32, flat; BYTES: the elements, flat
    binary: bool = False            # sent with the binary extension


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, Tensor]
    outputs: dict[str, bool]  # requested output -> sent binary
    parameters: dict = field(default_factory=dict)


# -- limits -----------------------------------------------------------------------------------
def body_limit(binary: bool, max_upload_bytes: int, max_duration_s: float,
               max_json_bytes: int) -> int:
    """The largest request body to read: with binary tensors, the upload cap (or a waveform of
    max_duration_s as float32, if larger) plus the JSON header; a JSON body, the larger of the
    base64 audio and the JSON waveform cap."""
    if binary:
        return max(max_upload_bytes, int(max_duration_s * 16_000) * 4) + HEADER_OVERHEAD
    return max(4 * math.ceil(max_upload_bytes / 3) + HEADER_OVERHEAD, max_json_bytes)


# -- requests ---------------------------------------------------------------------------------
def _shape(value, name: str) -> list[int]:
    """A client's shape, bounded step by step: its length first, then each dimension and the
    running product (a product of huge numbers is never computed)."""
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise _invalid(f"input {name!r}: shape must be a list of at most {MAX_DIMS} whole "
                       "numbers >= 0")
    count = 1
    for dim in value:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise _invalid(f"input {name!r}: shape must be a list of whole numbers >= 0")
        if dim > MAX_ELEMENTS or count * dim > MAX_ELEMENTS:
            raise _invalid(f"input {name!r}: shape {str(value)[:80]} is too large (at most "
                           f"{MAX_ELEMENTS} elements)")
        count *= dim
    return value


def split_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """A binary BYTES tensor -> its elements (each a 4-byte little-endian length, then bytes)."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise _invalid(f"input {name!r}: truncated BYTES element length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise _invalid(f"input {name!r}: a BYTES element runs past its tensor's data")
        elements.append(raw[offset:offset + size])
        offset += size
    if len(elements) != count:
        raise _invalid(f"input {name!r}: {len(elements)} BYTES elements for its shape's {count}")
    return elements


def join_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _flat(data) -> list:
    """A JSON tensor's data, nested (row-major) or flat, as a flat list (no recursion: the
    nesting depth is the client's)."""
    if not isinstance(data, list):
        raise _invalid("tensor data must be a list")
    flat, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _decode_tensor(spec: dict, binary: bytes | None) -> Tensor:
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise _invalid("every input needs a name")
    datatype = spec.get("datatype")
    shape = _shape(spec.get("shape"), name)
    count = math.prod(shape)
    if datatype == "FP32":
        if binary is not None:
            if len(binary) != 4 * count:
                raise _invalid(f"input {name!r}: {len(binary)} bytes of FP32 data for shape "
                               f"{shape} ({4 * count} expected)")
            return Tensor(name, datatype, shape,
                          np.frombuffer(binary, dtype="<f4").astype(np.float32), True)
        try:
            data = np.asarray(_flat(spec.get("data")), dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            raise _invalid(f"input {name!r}: FP32 data must be numbers") from None
        if data.size != count:
            raise _invalid(f"input {name!r}: {data.size} values for shape {shape}")
        return Tensor(name, datatype, shape, data)
    if datatype == "BYTES":
        if binary is not None:
            return Tensor(name, datatype, shape, split_bytes(binary, count, name), True)
        elements = _flat(spec.get("data"))
        if not all(isinstance(e, str) for e in elements) or len(elements) != count:
            raise _invalid(f"input {name!r}: BYTES data in JSON must be {count} strings")
        try:
            return Tensor(name, datatype, shape, [e.encode("utf-8") for e in elements])
        except UnicodeEncodeError:
            raise _invalid(f"input {name!r}: a BYTES element is not UTF-8 text") from None
    raise _invalid(f"input {name!r}: datatype {datatype!r} is not accepted (FP32 or BYTES)")


def _params(spec: dict) -> dict:
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise _invalid(f"{spec.get('name')!r}: parameters must be an object")
    return params


def _no_shared_memory(params: dict, name) -> None:
    if any(str(key).startswith("shared_memory") for key in params):
        raise ApiError(400, "unsupported_parameter",
                       f"{name!r}: shared memory is not supported; send the data in the body")


def _requested_outputs(specs, binary_default: bool) -> dict[str, bool]:
    if specs is None:
        return dict.fromkeys(DEFAULT_OUTPUTS, binary_default)
    if not isinstance(specs, list):
        raise _invalid("outputs must be a list")
    wanted: dict[str, bool] = {}
    for spec in specs:
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or name not in OUTPUTS:
            raise ApiError(400, "unknown_output",
                           f"unknown output {name!r}; this model has {list(OUTPUTS)}")
        params = _params(spec)
        if params.get("classification") or params.get("class_count"):
            raise ApiError(400, "unsupported_parameter", "the classification extension is "
                           "not supported: ask for the scores and labels outputs")
        _no_shared_memory(params, name)
        wanted[name] = bool(params.get("binary_data", binary_default))
    return wanted


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """An infer request, JSON or with binary tensors. Every failure is a 400 ApiError."""
    binary = b""
    if header_length is not None:
        try:
            length = whole_number(header_length, "Inference-Header-Content-Length", len(body))
        except ValueError:
            length = 0
        if length == 0:
            raise _invalid(f"Inference-Header-Content-Length {header_length[:40]!r} does not "
                           f"fit the {len(body)}-byte body")
        body, binary = body[:length], body[length:]
    try:
        document = load_json(body)
    except ValueError as exc:
        raise ApiError(400, "malformed_json", f"the request is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise _invalid('the request must be an object with a list of "inputs"')
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _invalid("parameters must be an object")
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise ApiError(400, "unknown_parameter",
                       f"unknown parameters {unknown}; expected {list(PARAMETERS)}")
    inputs, offset = {}, 0
    for spec in document["inputs"]:
        if not isinstance(spec, dict):
            raise _invalid("every input must be an object")
        params = _params(spec)
        _no_shared_memory(params, spec.get("name"))
        size = params.get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise _invalid(f"input {spec.get('name')!r}: binary_data_size {size!r} "
                               "runs past the body")
            raw, offset = binary[offset:offset + size], offset + size
        tensor = _decode_tensor(spec, raw)
        if tensor.name in inputs:
            raise _invalid(f"input {tensor.name!r} is given twice")
        inputs[tensor.name] = tensor
    if offset != len(binary):
        raise _invalid(f"{len(binary) - offset} bytes of binary data belong to no input")
    request_id = document.get("id")
    return InferRequest(str(request_id) if request_id is not None else None, inputs,
                        _requested_outputs(document.get("outputs"),
                                           bool(parameters.get("binary_data_output", False))),
                        parameters)


# -- this model's inputs ----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInput:
    audio: bytes | None = None            # an encoded file
    waveform: np.ndarray | None = None    # 16 kHz mono float32 samples


def model_input(request: InferRequest, max_upload_bytes: int) -> ModelInput:
    """The one input this model takes: `audio` BYTES [1] or `waveform` FP32 [n] / [1, n]."""
    unknown = sorted(set(request.inputs) - set(INPUTS))
    if unknown or len(request.inputs) != 1:
        raise _invalid(f"send exactly one input, audio (BYTES [1]) or waveform (FP32 [n]); got "
                       f"{sorted(request.inputs)}")
    (tensor,) = request.inputs.values()
    if tensor.datatype != INPUTS[tensor.name]:
        raise _invalid(f"input {tensor.name!r} must be {INPUTS[tensor.name]}, not "
                       f"{tensor.datatype}")
    if tensor.name == "waveform":
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[0] != 1):
            raise _invalid(f"waveform must be shaped [n] or [1, n], not {tensor.shape}")
        return ModelInput(waveform=tensor.data)
    if tensor.shape != [1]:
        raise _invalid(f"audio must be shaped [1] (one file), not {tensor.shape}")
    (element,) = tensor.data
    if not tensor.binary:
        try:
            element = base64.b64decode(element, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_base64", "in JSON, the audio element must be the "
                           "file's base64 (or send it binary)") from None
    if len(element) > max_upload_bytes:
        raise upload_too_large(max_upload_bytes)
    return ModelInput(audio=element)


# -- responses --------------------------------------------------------------------------------
def model_outputs(labels: list[str], scores: list[float], emotion: str,
                  embedding: np.ndarray | None = None) -> dict[str, Tensor]:
    """A prediction as this model's output tensors (labels: English names, the scores' order;
    embedding: (D,) for an utterance, (frames, D) per frame)."""
    outputs = {
        "scores": Tensor("scores", "FP32", [len(scores)], np.asarray(scores, np.float32)),
        "labels": Tensor("labels", "BYTES", [len(labels)], [n.encode() for n in labels]),
        "emotion": Tensor("emotion", "BYTES", [1], [emotion.encode()]),
    }
    if embedding is not None:
        frames = np.asarray(embedding, np.float32).reshape(-1, np.shape(embedding)[-1])
        outputs["embedding"] = Tensor("embedding", "FP32", list(frames.shape), frames.ravel())
    return outputs


def encode_infer_response(model_name: str, model_version: str | None, request_id: str | None,
                          outputs: dict[str, Tensor],
                          wanted: dict[str, bool]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: the wanted outputs, in the order asked, each as JSON
    data or binary (then Inference-Header-Content-Length gives the JSON header's size)."""
    tensors, chunks = [], []
    for name, binary in wanted.items():
        tensor = outputs[name]
        entry = {"name": name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary:
            raw = (join_bytes(tensor.data) if tensor.datatype == "BYTES"
                   else np.asarray(tensor.data, "<f4").tobytes())
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif tensor.datatype == "BYTES":
            entry["data"] = [element.decode("utf-8") for element in tensor.data]
        else:
            entry["data"] = np.asarray(tensor.data, np.float32).tolist()
        tensors.append(entry)
    document = {"model_name": model_name, "outputs": tensors}
    if model_version:
        document["model_version"] = model_version
    if request_id is not None:
        document["id"] = request_id
    header = json.dumps(document).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {"content-type": BINARY_CONTENT_TYPE,
                                       HEADER_LENGTH: str(len(header))}


# -- metadata, health, errors -----------------------------------------------------------------
def model_version(sha256: str | None) -> str | None:
    """A model's one version: the first 12 hex digits of its checkpoint's sha256."""
    return sha256[:VERSION_DIGITS] if sha256 else None


def server_metadata(version: str) -> dict:
    return {"name": "emotion2vec-serve", "version": version,
            "extensions": ["binary_tensor_data", "parameters"]}


def model_metadata(name: str, versions: list[str], embedding_dim: int | None) -> dict:
    """What a model takes and gives: one input of two, the outputs (-1: varies)."""
    dim = embedding_dim or -1
    return {
        "name": name,
        "versions": versions,
        "platform": "pytorch",
        "inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1]},
                   {"name": "waveform", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1]},
                    {"name": "labels", "datatype": "BYTES", "shape": [-1]},
                    {"name": "emotion", "datatype": "BYTES", "shape": [1]},
                    {"name": "embedding", "datatype": "FP32", "shape": [-1, dim]}],
        "parameters": {"granularity": "utterance or frame", "labels": "a label set",
                       "head": "a custom head, NAME[@REV]; or name the model VARIANT+HEAD[@REV]"},
    }


def error_body(exc: ApiError) -> dict:
    """The protocol's error shape, {"error": "<message>"}: the service's code leads the text."""
    return {"error": f"{exc.code}: {exc.message}"}
