"""Write emotion2vec+ model directories in the published format, with random weights.

No hub is reachable from the machines this project is built on, so the offline configs run
the real FunASR loading and inference code on checkpoints made here, in the published format
(serve_app/checkpoints/published.py): config.yaml, tokens.txt and configuration.json as
published, and a model.pt that is a fairseq-style dict whose "model" entry holds the weights,
encoder keys prefixed `d2v_model.`, the classifier head `proj.*` not, and no pre-training
decoder. With
`optimizer_state`, Adam's two moments per weight are added beside them, as in the published
files (model.pt ~3x the weights), so that loading such a file can be tested and measured.

The weights are random and deterministic for a seed; every such directory carries
RANDOM_WEIGHTS.json so that the service can say plainly that its answers mean nothing. The
marker's `format` tells this layout from the plain state_dict of earlier versions, whose
directories are regenerated when asked for again.

    python -m serve_app.checkpoints --arch tiny --seed 0 --out /tmp/e2v-tiny [--optimizer-state]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from serve_app.checkpoints import published, weights

logger = logging.getLogger(__name__)

RANDOM_MARKER = "RANDOM_WEIGHTS.json"
FORMAT = 2  # 2: the published layout; 1 (no "format" in the marker): a plain state_dict
ARCHITECTURES = tuple(published.SIZES)
TOKENS = published.TOKENS


def model_config(arch: str) -> dict:
    """The config.yaml of `arch`, parsed."""
    return yaml.safe_load(published.config_yaml(arch))


def is_complete(directory: Path) -> bool:
    return not weights.model_files(Path(directory)).missing()


def random_weights_info(directory: Path) -> dict | None:
    """The marker's content when `directory` holds generated random weights, else None."""
    marker = Path(directory) / RANDOM_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # Several replicas (large and turbo share a checkpoint) may ask for the same
    # directory at once: one writes it, the others wait and then find it complete.
    # The lock covers the replicas of one node (and of several nodes where a shared
    # filesystem supports flock); where the filesystem has no locks, the atomic rename in
    # _publish keeps the writers apart.
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        locked = True
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                raise
            logger.warning("%s: the filesystem has no file locks; relying on rename", lock_path)
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _publish(staging: Path, target: Path) -> bool:
    """Rename the written folder into place; False when another writer (another node on a
    shared filesystem) got there first with a complete checkpoint, whose copy is kept."""
    try:
        os.rename(staging, target)
        return True
    except OSError:
        if not is_complete(target):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False


def published_checkpoint(arch: str, seed: int, optimizer_state: bool = False) -> dict:
    """model.pt's content: {"model": weights as published} (+ Adam's moments on request)."""
    import torch
    from funasr.models.emotion2vec.model import Emotion2vec

    # Built with FunASR's own class: the weights always fit what FunASR builds.
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Emotion2vec(**model_config(arch), vocab_size=len(TOKENS))
    finally:
        torch.random.set_rng_state(generator_state)
    weights.drop_pretraining_decoder(model)
    state = {(key if key.startswith(published.UNPREFIXED) else published.WEIGHTS_PREFIX + key):
             tensor for key, tensor in model.state_dict().items()}
    checkpoint: dict = {"model": state}
    if optimizer_state:
        moments = torch.Generator().manual_seed(seed + 1)
        checkpoint["last_optimizer_state"] = {
            "state": {index: {"exp_avg": torch.randn(t.shape, generator=moments) * 1e-4,
                              "exp_avg_sq": torch.rand(t.shape, generator=moments) * 1e-8}
                      for index, t in enumerate(state.values())},
            "param_groups": [{"lr": 5e-5, "betas": [0.9, 0.98], "eps": 1e-6,
                              "weight_decay": 0.01, "params": list(range(len(state)))}],
        }
        checkpoint["optimizer_history"] = [{"optimizer_name": "AdamOptimizer",
                                            "lr_scheduler_state": {}, "num_updates": 100000}]
    return checkpoint


def _write(folder: Path, arch: str, seed: int, optimizer_state: bool) -> None:
    import torch

    checkpoint = published_checkpoint(arch, seed, optimizer_state)
    torch.save(checkpoint, folder / "model.pt")
    params = sum(t.numel() for t in checkpoint["model"].values())
    (folder / "config.yaml").write_text(published.config_yaml(arch), encoding="utf-8")
    (folder / "tokens.txt").write_text(published.TOKENS_TXT, encoding="utf-8")
    (folder / "configuration.json").write_text(published.CONFIGURATION_JSON, encoding="utf-8")
    (folder / RANDOM_MARKER).write_text(json.dumps(
        {"weights": "random", "format": FORMAT, "layout": "published", "arch": arch,
         "seed": seed, "optimizer_state": optimizer_state, "params": params,
         "note": "Generated with random weights: predictions carry no meaning."}, indent=2))


def _current(target: Path, arch: str, seed: int, optimizer_state: bool) -> bool:
    """True when `target` already holds what is asked for (or weights that are not ours);
    False when it holds an older generator's checkpoint, to be replaced."""
    marker = random_weights_info(target)
    if marker is None:
        return True  # not generated here: real weights are never touched
    if marker.get("format") != FORMAT:
        logger.warning("%s holds a checkpoint of an older generator (%s, format %s, a plain "
                       "state_dict): replacing it with a %s checkpoint in the published format",
                       target, marker.get("arch"), marker.get("format", 1), arch)
        return False
    found = (marker.get("arch"), marker.get("seed"), bool(marker.get("optimizer_state")))
    if found != (arch, seed, optimizer_state):
        raise ValueError(f"{target} already holds a {found[0]} checkpoint with seed {found[1]} "
                         f"(optimizer state: {found[2]}), not {arch} seed {seed} "
                         f"(optimizer state: {optimizer_state})")
    return True


def write_checkpoint(directory: str | os.PathLike, arch: str, seed: int = 0, *,
                     optimizer_state: bool = False) -> Path:
    """Write a random-weight checkpoint of `arch` into `directory` unless one is there.

    Atomic: the files are written in a sibling temp folder that is renamed into place, so a
    reader never sees half a checkpoint. Returns the directory.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    target = Path(directory).expanduser().resolve()
    with _exclusive(target.parent / f".{target.name}.lock"):
        outdated = False
        if is_complete(target):
            if _current(target, arch, seed, optimizer_state):
                return target
            outdated = True
        elif target.exists():
            raise ValueError(f"{target} exists but is not a complete checkpoint; remove it")
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _write(staging, arch, seed, optimizer_state)
            if outdated:
                # Moved aside, then removed: a process still mapping the old model.pt keeps it.
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
                os.rename(target, old / "checkpoint")
                shutil.rmtree(old, ignore_errors=True)
            published = _publish(staging, target)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if outdated and isinstance(exc, OSError):
                raise ValueError(f"{target} holds an outdated generated checkpoint that could "
                                 f"not be replaced ({exc}): remove it") from exc
            raise
    if not published:  # another node's writer was first: its copy must be what we asked for
        _current(target, arch, seed, optimizer_state)
        return target
    logger.warning("wrote a %s checkpoint with RANDOM weights (seed %d%s) to %s", arch, seed,
                   ", with optimizer state" if optimizer_state else "", target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="directory to write (created)")
    parser.add_argument("--optimizer-state", action="store_true",
                        help="add Adam's moments beside the weights, as published (~3x)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    print(write_checkpoint(args.out, args.arch, args.seed, optimizer_state=args.optimizer_state))


if __name__ == "__main__":
    main()
