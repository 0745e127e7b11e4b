"""emotion2vec checkpoint files: find them, read them, map their keys, verify them.

Every loader uses these functions, so that a file loads the same way whichever path reads it.

- `model_files`: which config, weights and token files a model directory names, as FunASR
  finds them (configuration.json's `file_path_metas` where it names existing files).
- `read_weights`: the checkpoint memory-mapped and weights-only, then the state dict inside
  it, unwrapped as FunASR does (`state_dict`, then `model_state_dict`, then `model`, each when
  present). A published model.pt keeps its weights under `model` beside optimizer state about
  twice their size: those entries are mapped, never read into memory.
- `scope_pairs` and `source_key`: FunASR's key mapping (`load_pretrained_model`): the config's
  top-level `scope_map` (published: `['d2v_model.', none]`; YAML `none` is the string "none")
  plus `module.`, the last matching pair winning.
- `select`: the tensors for a model, strictly: every tensor the model has must be in the file
  with its shape (FunASR only warns, then serves random values). The pre-training decoder,
  absent from published files and unused by inference, is removed from the model beforehand
  (`drop_pretraining_decoder`), so it is never materialised and never required.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from serve_app.errors import ModelLoadError

EXAMPLES = 3  # offending keys named in an error


@dataclass(frozen=True)
class ModelFiles:
    config: Path
    weights: Path
    tokens: Path

    def missing(self) -> list[str]:
        return [path.name for path in (self.config, self.weights, self.tokens)
                if not path.is_file()]


def model_files(directory: Path) -> ModelFiles:
    """The files FunASR reads from `directory`: configuration.json's `file_path_metas` where
    they exist (the published ones name the defaults), else config.yaml, model.pt, tokens.txt."""
    names = {"config": "config.yaml", "weights": "model.pt", "tokens": "tokens.txt"}
    meta_file = directory / "configuration.json"
    if meta_file.is_file():
        try:
            metas = json.loads(meta_file.read_text(encoding="utf-8")).get("file_path_metas", {})
        except (ValueError, AttributeError) as exc:
            raise ModelLoadError(f"{meta_file} is not valid JSON: {exc}") from exc
        named = {"config": metas.get("config"), "weights": metas.get("init_param"),
                 "tokens": (metas.get("tokenizer_conf") or {}).get("token_list")}
        for role, name in named.items():
            if isinstance(name, str) and (directory / name).is_file():
                names[role] = name
    return ModelFiles(**{role: directory / name for role, name in names.items()})


def file_sha256(path: str | Path) -> str:
    """A file's sha256 (hex), read in chunks: which weights (or which clip) exactly."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_labels(tokens: Path) -> list[str]:
    """tokens.txt as FunASR's tokenizer reads it: one label a line, right-stripped."""
    with tokens.open(encoding="utf-8") as handle:
        return [line.rstrip() for line in handle]


def read_weights(path: Path) -> Mapping:
    """The state dict inside the checkpoint at `path`, memory-mapped (nothing read yet)."""
    import torch

    try:
        # mmap needs the zip format (torch >= 1.6); an older file is read whole.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True,
                                mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    state = checkpoint
    for key in ("state_dict", "model_state_dict", "model"):  # FunASR's order, each if present
        if isinstance(state, Mapping) and key in state:
            state = state[key]
    if not isinstance(state, Mapping):
        raise ModelLoadError(f"{path} holds no state dict (found {type(state).__name__})")
    return state


def scope_pairs(scope_map, origin: object = "config.yaml") -> list[tuple[str, str]]:
    """(source prefix, model prefix) pairs: the config's scope_map, then FunASR's own
    ('module.', none). "none" in any case means no prefix."""
    if scope_map is None:
        scope_map = []
    if isinstance(scope_map, str):
        scope_map = scope_map.split(",")
    if not isinstance(scope_map, (list, tuple)) or len(scope_map) % 2 \
            or not all(isinstance(item, str) for item in scope_map):
        raise ModelLoadError(f"{origin}: scope_map must list prefixes in pairs "
                             f"(e.g. ['d2v_model.', none]), not {scope_map!r}")
    items = [*scope_map, "module.", "None"]
    prefix = [("" if item.lower() == "none" else item) for item in items]
    return list(zip(prefix[0::2], prefix[1::2]))


def source_key(key: str, available: Mapping, pairs: list[tuple[str, str]]) -> str | None:
    """The file's key for model key `key`, exactly as FunASR's load_pretrained_model picks it,
    or None when the file has none."""
    found = key
    for source, target in pairs:
        if target == "" and source + key in available:
            found = source + key
        elif key.startswith(target) and key.replace(target, source, 1) in available:
            found = key.replace(target, source, 1)
    return found if found in available else None


def drop_pretraining_decoder(model) -> None:
    """FunASR's own `remove_pretraining_modules`: the audio decoder serves pre-training only
    (extract_features never calls it) and published checkpoints do not carry it."""
    model.modality_encoders["AUDIO"].remove_pretraining_modules()


def select(expected: Mapping, state: Mapping, pairs: list[tuple[str, str]],
           path: Path) -> dict:
    """{model key: tensor from the file} for every key of `expected` (a state_dict, on the
    meta device or not), in the model's dtype. Raises ModelLoadError naming `path` and the
    first offending keys when any is missing, not a tensor, or of another shape."""
    import torch

    chosen, used, missing, wrong = {}, set(), [], []
    for key, like in expected.items():
        source = source_key(key, state, pairs)
        tensor = state[source] if source is not None else None
        if not isinstance(tensor, torch.Tensor):
            missing.append(key)
            continue
        used.add(source)
        if tuple(tensor.shape) != tuple(like.shape):
            wrong.append(f"{source}: {list(tensor.shape)} in the file, "
                         f"{list(like.shape)} in the model")
            continue
        chosen[key] = tensor if tensor.dtype == like.dtype else tensor.to(like.dtype)
    if missing or wrong:
        details = []
        if missing:
            details.append(f"missing {', '.join(missing[:EXAMPLES])}")
            unused = [k for k in state if k not in used][:EXAMPLES]
            if unused:
                details.append(f"unused keys in the file: {', '.join(unused)}")
        if wrong:
            details.append(f"mis-shaped {'; '.join(wrong[:EXAMPLES])}")
        raise ModelLoadError(
            f"{path} does not fit the model its config describes: {len(missing)} missing and "
            f"{len(wrong)} mis-shaped tensors ({'; '.join(details)})")
    return chosen
