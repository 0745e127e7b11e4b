"""The application builder named by the configs: `import_path: serve_app.app:build_app`.

It wires one EmotionModel deployment per variant behind the Router, with each variant's
resources from the args, and refuses at deploy time a config that asks for more GPUs or
CPUs than the cluster has: otherwise Serve leaves such replicas pending forever.
"""

from __future__ import annotations

import ray
from ray.serve import Application

from serve_app.config import AppArgs
from serve_app.model import EmotionModel
from serve_app.router import Router


class ResourceError(ValueError):
    """The config asks for resources the cluster does not have."""


def check_resources(args: AppArgs, available: dict[str, float]) -> None:
    """Raise ResourceError, naming the fix, if one replica of every deployment cannot fit."""
    gpus = sum(v.num_gpus for v in args.variants.values())
    have_gpus = available.get("GPU", 0.0)
    if gpus > have_gpus + 1e-9:
        asking = {n: v.num_gpus for n, v in args.variants.items() if v.num_gpus}
        raise ResourceError(
            f"the variants ask for {gpus:g} GPUs {asking} but the cluster has {have_gpus:g}. "
            "Deploy configs/cpu.yaml on a machine without GPUs, configs/single-gpu.yaml to share "
            "one GPU, or lower num_gpus in the config's args.variants")
    cpus = sum(v.num_cpus for v in args.variants.values()) + args.router_num_cpus
    have_cpus = available.get("CPU", 0.0)
    if cpus > have_cpus + 1e-9:
        raise ResourceError(
            f"the deployments ask for {cpus:g} CPUs but the cluster has {have_cpus:g}. "
            "Lower num_cpus in args.variants (threads can stay higher: set `threads` in the "
            "variant's user_config)")


def build_app(args: dict) -> Application:
    app_args = AppArgs.model_validate(args)
    if app_args.check_resources:
        check_resources(app_args, ray.cluster_resources())
    handles = {
        name: EmotionModel.options(
            name=name,
            ray_actor_options={"num_cpus": res.num_cpus, "num_gpus": res.num_gpus},
        ).bind(name)
        for name, res in app_args.variants.items()
    }
    return Router.options(ray_actor_options={"num_cpus": app_args.router_num_cpus}).bind(handles)
