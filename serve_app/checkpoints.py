"""Write emotion2vec model directories that FunASR loads, with random weights.

No hub is reachable from the machines this project is built on, so the offline configs
run the real FunASR loading and inference code on checkpoints made here: the published
file layout (config.yaml, model.pt, tokens.txt, configuration.json) and the published
architectures (base, large), plus a tiny one for tests. The weights are random and
deterministic for a seed; every such directory carries RANDOM_WEIGHTS.json so that the
service can say plainly that its answers mean nothing.

    python -m serve_app.checkpoints --arch tiny --seed 0 --out /tmp/e2v-tiny
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import yaml

logger = logging.getLogger(__name__)

RANDOM_MARKER = "RANDOM_WEIGHTS.json"

# FunASR's CharTokenizer order for emotion2vec+ (index i is the head's output i).
TOKENS = ["生气/angry", "厌恶/disgusted", "恐惧/fearful", "开心/happy", "中立/neutral",
          "其他/other", "难过/sad", "吃惊/surprised", "<unk>"]

# (embed_dim, depth, prenet_depth, heads, extra tokens, decoder_dim, conv channels)
ARCHITECTURES = {
    "tiny": (64, 2, 1, 4, 2, 32, 32),
    "base": (768, 8, 4, 12, 10, 384, 512),
    "large": (1024, 16, 8, 16, 10, 768, 512),
}


def model_config(arch: str) -> dict:
    """The config.yaml content of the published emotion2vec+ checkpoints, sized for `arch`."""
    dim, depth, prenet, heads, extra, decoder_dim, ch = ARCHITECTURES[arch]
    spec = f"[({ch}, 10, 5)] + [({ch}, 3, 2)] * 4 + [({ch},2,2)] + [({ch},2,2)]"
    audio = {
        "type": "AUDIO", "prenet_depth": prenet, "prenet_layerdrop": 0.05,
        "prenet_dropout": 0.1, "start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0,
        "num_extra_tokens": extra, "init_extra_token_zero": True, "mask_noise_std": 0.01,
        "mask_prob_min": None, "inverse_mask": False, "mask_prob": 0.5,
        "mask_prob_adjust": 0.05, "keep_masked_pct": 0.0, "mask_length": 5,
        "add_masks": False, "remove_masks": False, "mask_dropout": 0.0,
        "encoder_zero_mask": True, "mask_channel_prob": 0.0, "mask_channel_length": 64,
        "ema_local_encoder": False, "local_grad_mult": 1.0, "use_alibi_encoder": True,
        "alibi_scale": 1.0, "learned_alibi": False, "alibi_max_pos": None,
        "learned_alibi_scale": True, "learned_alibi_scale_per_head": True,
        "learned_alibi_scale_per_layer": False, "num_alibi_heads": heads,
        "model_depth": depth,
        "decoder": {
            "decoder_dim": decoder_dim, "decoder_groups": 16, "decoder_kernel": 7,
            "decoder_layers": 4, "input_dropout": 0.1, "add_positions_masked": False,
            "add_positions_all": False, "decoder_residual": True, "projection_layers": 1,
            "projection_ratio": 2.0,
        },
        "extractor_mode": "layer_norm", "feature_encoder_spec": spec,
        "conv_pos_width": 95, "conv_pos_groups": 16, "conv_pos_depth": 5,
        "conv_pos_pre_ln": False,
    }
    conf = {
        "loss_beta": 0.0, "loss_scale": None, "depth": depth, "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0, "num_heads": heads, "norm_eps": 1e-05, "norm_affine": True,
        "encoder_dropout": 0.1, "post_mlp_drop": 0.1, "attention_dropout": 0.1,
        "activation_dropout": 0.0, "dropout_input": 0.0, "layerdrop": 0.05,
        "embed_dim": dim, "mlp_ratio": 4.0, "layer_norm_first": False,
        "average_top_k_layers": depth, "end_of_block_targets": False, "clone_batch": 8,
        "layer_norm_target_layer": False, "batch_norm_target_layer": False,
        "instance_norm_target_layer": True, "instance_norm_targets": False,
        "layer_norm_targets": False, "ema_decay": 0.999, "ema_same_dtype": True,
        "log_norms": True, "ema_end_decay": 0.99999, "ema_anneal_end_step": 20000,
        "ema_encoder_only": False, "max_update": 100000, "extractor_mode": "layer_norm",
        "shared_decoder": None, "min_target_var": 0.1, "min_pred_var": 0.01,
        "supported_modality": "AUDIO", "mae_init": False, "seed": 1, "skip_ema": False,
        "cls_loss": 1.0, "recon_loss": 0.0, "d2v_loss": 1.0, "decoder_group": False,
        "adversarial_training": False, "adversarial_hidden_dim": 128,
        "adversarial_weight": 0.1, "cls_type": "chunk", "normalize": True,
        "project_ln": False, "modalities": {"audio": audio},
    }
    return {
        "model": "Emotion2vec",
        "model_conf": conf,
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
    }


CONFIGURATION_JSON = {
    "framework": "pytorch",
    "task": "emotion-recognition",
    "model": {"type": "emotion2vec"},
    "pipeline": {"type": "emotion-recognition"},
    "file_path_metas": {
        "init_param": "model.pt",
        "config": "config.yaml",
        "tokenizer_conf": {"token_list": "tokens.txt"},
    },
}


def is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in ("config.yaml", "model.pt", "tokens.txt"))


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


def write_checkpoint(directory: str | os.PathLike, arch: str, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of `arch` into `directory` unless one is there.

    Atomic: the files are written in a sibling temp folder that is renamed into place, so a
    reader never sees half a checkpoint. Returns the directory.
    """
    import torch
    from funasr.models.emotion2vec.model import Emotion2vec

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    target = Path(directory).expanduser().resolve()
    with _exclusive(target.parent / f".{target.name}.lock"):
        if is_complete(target):
            return _same_checkpoint(target, arch, seed)
        if target.exists():
            raise ValueError(f"{target} exists but is not a complete checkpoint; remove it")
        config = model_config(arch)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            # Build with FunASR's own class so the state_dict always matches what AutoModel builds.
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
            kwargs = copy.deepcopy(config)
            model = Emotion2vec(**kwargs, vocab_size=len(TOKENS))
            torch.random.set_rng_state(generator_state)
            torch.save(model.state_dict(), staging / "model.pt")
            params = sum(p.numel() for p in model.parameters())
            del model
            (staging / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True,
                                                                 sort_keys=False))
            (staging / "tokens.txt").write_text("\n".join(TOKENS) + "\n", encoding="utf-8")
            (staging / "configuration.json").write_text(json.dumps(CONFIGURATION_JSON, indent=2))
            (staging / RANDOM_MARKER).write_text(json.dumps(
                {"weights": "random", "arch": arch, "seed": seed, "params": params,
                 "note": "Generated with random weights: predictions carry no meaning."},
                indent=2))
            published = _publish(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if not published:
        return _same_checkpoint(target, arch, seed)
    logger.warning("wrote a %s checkpoint with RANDOM weights (seed %d) to %s", arch, seed, target)
    return target


def _same_checkpoint(target: Path, arch: str, seed: int) -> Path:
    """`target`, complete, if it holds what was asked for (or real weights)."""
    marker = random_weights_info(target)
    if marker and (marker.get("arch"), marker.get("seed")) != (arch, seed):
        raise ValueError(f"{target} already holds a {marker.get('arch')} checkpoint "
                         f"with seed {marker.get('seed')}, not {arch} seed {seed}")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="directory to write (created)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    print(write_checkpoint(args.out, args.arch, args.seed))


if __name__ == "__main__":
    main()
