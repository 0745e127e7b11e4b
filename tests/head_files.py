"""Head files for tests: valid ones with seeded random weights for a given backbone, and raw
files that skip headfile.encode's checks (to send what a hostile client would)."""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import save

from serve_app.heads import headfile


def head_bytes(name: str, sha256: str, dim: int, labels=("satisfied", "neutral", "frustrated"),
               kind: str = "linear", seed: int = 0, temperature: float = 1.5) -> bytes:
    """A valid head of `kind` for the backbone (checkpoint sha256, embedding dim)."""
    rng = np.random.default_rng(seed)
    classes = len(labels)
    if kind == "prototype":
        centroids = rng.normal(size=(classes, dim))
        tensors = {"centroids": centroids / np.linalg.norm(centroids, axis=1, keepdims=True)}
    else:
        tensors = {"mean": rng.normal(size=dim) * 0.1,
                   "scale": np.abs(rng.normal(size=dim)) + 0.5}
        width = dim
        if kind == "mlp":
            tensors["hidden_weight"] = rng.normal(size=(16, dim))
            tensors["hidden_bias"] = rng.normal(size=16)
            width = 16
        tensors["weight"] = rng.normal(size=(classes, width))
        tensors["bias"] = rng.normal(size=classes)
    return headfile.encode(metadata(name, sha256, dim, list(labels), kind, temperature), tensors)


def metadata(name: str, sha256: str, dim: int, labels: list[str], kind: str = "linear",
             temperature: float = 1.5) -> dict:
    return {"name": name, "kind": kind, "labels": labels, "embedding_dim": dim,
            "temperature": temperature,
            "backbone": {"arch": "tiny", "sha256": sha256, "embedding_dim": dim},
            "metrics": {"overall": {"ua": 0.8, "wa": 0.82, "macro_f1": 0.79,
                                    "confusion": {"labels": labels,
                                                  "matrix": [[1] * len(labels)] * len(labels)}}},
            "created": "2026-12-07T00:00:00Z"}


def raw_head(meta: dict, tensors: dict[str, np.ndarray]) -> bytes:
    """A safetensors file with head metadata and a matching sha256, nothing else checked."""
    arrays = {name: np.asarray(array) for name, array in tensors.items()}
    meta = {**meta, "format": headfile.FORMAT}
    meta["sha256"] = headfile.content_sha256(meta, {k: v.astype(np.float32)
                                                    for k, v in arrays.items()})
    return save(arrays, metadata={headfile.METADATA_KEY: json.dumps(meta)})
