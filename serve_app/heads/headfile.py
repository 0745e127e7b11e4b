"""A custom head: a small classifier over the emotion2vec utterance embedding, and its file.

The file is one safetensors file, never a pickle: the weights as float32 tensors, and the
metadata as JSON in the header's `__metadata__["emotion2vec_head"]` (name, revision, kind,
labels, embedding dimension, temperature, the backbone it was trained on, metrics, a training
summary and its own sha256). Nothing in it is executed; every field is checked on read.

Kinds, on an utterance embedding x (the mean of the clip's frames, as the nine-class head):
- linear:    z = (x - mean) / scale;  logits = z W^T + b
- mlp:       z as linear;  logits = relu(z H^T + h) W^T + b
- prototype: logits = (x / |x|) C^T, C one unit centroid per label (cosine similarity)
The scores are the softmax of logits / temperature (fitted on held-out folds: calibrated
confidence). The math is numpy in float64 here and nowhere else: the variant serves with it,
training evaluates with it, tests compare with it.

The sha256 covers the metadata (but the sha256 field) and every tensor's name, shape and
bytes: a truncated or edited file does not match. No Ray, no torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from serve_app import untrusted
from serve_app.errors import ApiError

FORMAT = "emotion2vec-head/1"
METADATA_KEY = "emotion2vec_head"
KINDS = ("linear", "mlp", "prototype")
MAX_LABELS = 256
MAX_HIDDEN = 4096
MAX_HEADER_BYTES = 1024 * 1024
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")          # a head's name: a path segment
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+-]{0,63}")  # no '/': FunASR's zh/en separator
REFERENCE = re.compile(r"(?P<name>[^@]{1,63})(?:@(?P<revision>[0-9]{1,9}))?")


class InvalidHead(ValueError):
    """A head file that cannot be served (422 invalid_head): nothing is stored."""

    def api_error(self) -> ApiError:
        return ApiError(422, "invalid_head", str(self))


class UnknownHead(LookupError):
    """No head (or no such revision) by that name (404 unknown_head)."""

    def api_error(self) -> ApiError:
        return ApiError(404, "unknown_head", str(self))


class HeadBackboneMismatch(ValueError):
    """A head trained on another checkpoint or dimension (409 head_backbone_mismatch)."""

    def api_error(self) -> ApiError:
        return ApiError(409, "head_backbone_mismatch", str(self))


def parse_reference(text: str) -> tuple[str, int | None]:
    """'support-calls' or 'support-calls@4' -> (name, revision or None: the latest)."""
    match = REFERENCE.fullmatch(text.strip())
    if not match or not NAME.fullmatch(match["name"]):
        raise ApiError(422, "invalid_parameter",
                       f"head must be NAME or NAME@REVISION (NAME: lower-case letters, digits, "
                       f"'.', '_', '-'), not {text[:80]!r}")
    revision = match["revision"]
    return match["name"], int(revision) if revision else None


def _expected_shapes(kind: str, classes: int, dim: int, hidden: int | None) -> dict:
    if kind == "linear":
        return {"mean": (dim,), "scale": (dim,), "weight": (classes, dim), "bias": (classes,)}
    if kind == "mlp":
        return {"mean": (dim,), "scale": (dim,), "hidden_weight": (hidden, dim),
                "hidden_bias": (hidden,), "weight": (classes, hidden), "bias": (classes,)}
    return {"centroids": (classes, dim)}


def content_sha256(metadata: Mapping, tensors: Mapping[str, np.ndarray]) -> str:
    """The head's own sha256: its metadata but the sha256 field, and its tensors."""
    digest = hashlib.sha256()
    fields = {key: value for key, value in metadata.items() if key != "sha256"}
    digest.update(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name], dtype="<f4")
        digest.update(f"\0{name}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Head:
    metadata: dict
    tensors: dict[str, np.ndarray]

    name = property(lambda self: self.metadata["name"])
    revision = property(lambda self: self.metadata.get("revision"))
    kind = property(lambda self: self.metadata["kind"])
    labels = property(lambda self: list(self.metadata["labels"]))
    temperature = property(lambda self: float(self.metadata["temperature"]))
    embedding_dim = property(lambda self: int(self.metadata["embedding_dim"]))
    backbone = property(lambda self: dict(self.metadata["backbone"]))
    sha256 = property(lambda self: self.metadata["sha256"])

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """N x D utterance embeddings -> N x C float64 logits (before the temperature)."""
        x = np.asarray(embeddings, dtype=np.float64)
        t = {name: array.astype(np.float64) for name, array in self.tensors.items()}
        if self.kind == "prototype":
            norms = np.linalg.norm(x, axis=-1, keepdims=True)
            return (x / np.maximum(norms, 1e-12)) @ t["centroids"].T
        z = (x - t["mean"]) / t["scale"]
        if self.kind == "mlp":
            z = np.maximum(z @ t["hidden_weight"].T + t["hidden_bias"], 0.0)
        return z @ t["weight"].T + t["bias"]

    def scores(self, logits: np.ndarray, keep: Sequence[int]) -> list[float]:
        """The calibrated softmax over one row's `keep` labels (head order), the others
        left out: as a label set masks the nine-class head."""
        row = np.asarray(logits, dtype=np.float64)[list(keep)] / self.temperature
        row = np.exp(row - row.max())
        return (row / row.sum()).tolist()

    def reference(self) -> dict:
        """What an answer says of the head that scored it."""
        return {"name": self.name, "revision": self.revision, "sha256": self.sha256}


def _check_metadata(meta) -> dict:
    if not isinstance(meta, dict):
        raise InvalidHead("its metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise InvalidHead(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    name = meta.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidHead(f"invalid name {str(name)[:80]!r}: lower-case letters, digits, '.', "
                          "'_' and '-', at most 63, starting with a letter or digit")
    if meta.get("kind") not in KINDS:
        raise InvalidHead(f"kind must be one of {list(KINDS)}, not {meta.get('kind')!r}")
    labels = meta.get("labels")
    if not isinstance(labels, list) or not 2 <= len(labels) <= MAX_LABELS:
        raise InvalidHead(f"labels must be a list of 2 to {MAX_LABELS} names")
    bad = [label for label in labels if not isinstance(label, str) or not LABEL.fullmatch(label)
           or label.lower().startswith("unuse")]
    if bad:
        raise InvalidHead(f"invalid labels {bad[:5]!r}: letters, digits, ' ', '_', '.', '+', "
                          "'-', at most 64 each")
    if len({label.lower() for label in labels}) != len(labels):
        raise InvalidHead("labels must differ (case aside)")
    dim, revision = meta.get("embedding_dim"), meta.get("revision")
    if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= 65536:
        raise InvalidHead("embedding_dim must be a whole number from 1 to 65536")
    if revision is not None and (not isinstance(revision, int) or isinstance(revision, bool)
                                 or not 1 <= revision < 10**9):
        raise InvalidHead("revision must be a whole number from 1")
    temperature = meta.get("temperature")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or \
            not 1e-3 <= temperature <= 1e3:
        raise InvalidHead("temperature must be a number from 0.001 to 1000")
    backbone = meta.get("backbone")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("sha256"), str) or \
            not re.fullmatch(r"[0-9a-f]{64}", backbone["sha256"]) or \
            backbone.get("embedding_dim") != dim:
        raise InvalidHead("backbone must give the checkpoint's sha256 and the embedding_dim")
    return meta


def _check_tensors(meta: dict, tensors: dict[str, np.ndarray]) -> None:
    hidden = tensors.get("hidden_bias")
    hidden = hidden.shape[0] if hidden is not None and hidden.ndim == 1 else None
    if meta["kind"] == "mlp" and (hidden is None or not 1 <= hidden <= MAX_HIDDEN):
        raise InvalidHead(f"an mlp head needs hidden_bias of 1 to {MAX_HIDDEN} units")
    expected = _expected_shapes(meta["kind"], len(meta["labels"]), meta["embedding_dim"], hidden)
    if set(tensors) != set(expected):
        raise InvalidHead(f"a {meta['kind']} head has tensors {sorted(expected)}, this one "
                          f"{sorted(tensors)[:10]}")
    for name, shape in expected.items():
        array = tensors[name]
        if array.dtype != np.float32 or array.shape != shape:
            raise InvalidHead(f"tensor {name} is {array.dtype} {list(array.shape)}, expected "
                              f"float32 {list(shape)}")
        if not np.isfinite(array).all():
            raise InvalidHead(f"tensor {name} holds NaN or infinite values")
    if "scale" in tensors and not (tensors["scale"] > 0).all():
        raise InvalidHead("scale must be above 0 everywhere")


def encode(metadata: Mapping, tensors: Mapping[str, np.ndarray]) -> bytes:
    """A head file's bytes; its sha256 is computed here (the one given is replaced)."""
    from safetensors.numpy import save

    arrays = {name: np.ascontiguousarray(array, dtype=np.float32)
              for name, array in tensors.items()}
    meta = {**metadata, "format": FORMAT}
    meta["sha256"] = content_sha256(meta, arrays)
    _check_tensors(_check_metadata(meta), arrays)
    return save(arrays, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def read_header(data: bytes) -> tuple[dict, int]:
    """A safetensors file's JSON header (its first 8 bytes say how long it is) and where the
    tensors start; InvalidHead for anything else (a pickle starts with 0x80: never loaded)."""
    if len(data) < 8:
        raise InvalidHead("not a head file: shorter than a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER_BYTES:
        raise InvalidHead("not a head file (a safetensors file with emotion2vec_head "
                          "metadata; pickles are never loaded)")
    if len(data) < 8 + length:
        raise InvalidHead("truncated: the header runs past the end of the file")
    try:
        header = untrusted.load_json(data[8:8 + length])
    except ValueError as exc:
        raise InvalidHead(f"not a head file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidHead("not a head file: its header is not a JSON object")
    return header, 8 + length


def metadata_of(header: dict) -> dict:
    """The head's metadata from a safetensors header, checked."""
    text = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if not isinstance(text, str):
        raise InvalidHead(f"a safetensors file without {METADATA_KEY} metadata is not a head")
    try:
        return _check_metadata(untrusted.load_json(text))
    except ValueError as exc:
        if isinstance(exc, InvalidHead):
            raise
        raise InvalidHead(f"its metadata is not JSON ({exc})") from None


def decode(data: bytes, max_bytes: int) -> Head:
    """A head file's bytes -> a Head, every field and tensor checked (InvalidHead)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if len(data) > max_bytes:
        raise InvalidHead(f"larger than {max_bytes} bytes")
    header, _ = read_header(data)
    meta = metadata_of(header)
    described = sum(1 for key in header if key != "__metadata__")
    if described > 8:
        raise InvalidHead(f"{described} tensors; a head has at most 6")
    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, TypeError) as exc:
        raise InvalidHead(f"truncated or malformed tensors ({exc})") from None
    _check_tensors(meta, tensors)
    if meta.get("sha256") != content_sha256(meta, tensors):
        raise InvalidHead("its sha256 does not match its content (edited or damaged)")
    return Head(meta, tensors)


def check_backbone(head: Head, checkpoint_sha256: str | None, embedding_dim: int) -> None:
    """HeadBackboneMismatch unless `head` was trained on this checkpoint (turbo shares
    large's checkpoint, so it runs large's heads)."""
    backbone = head.backbone
    if backbone["sha256"] != checkpoint_sha256 or head.embedding_dim != embedding_dim:
        raise HeadBackboneMismatch(
            f"head {head.name}@{head.revision} was trained on checkpoint "
            f"{backbone['sha256'][:12]} ({head.embedding_dim}-d); this variant serves "
            f"{str(checkpoint_sha256)[:12]} ({embedding_dim}-d)")
