"""The application builder named by the configs: `import_path: serve_app.app:build_app`.

It wires one EmotionModel deployment per variant behind the Router, with each variant's
resources from the args, and refuses at deploy time a config that the cluster cannot hold:
otherwise Serve leaves such replicas pending forever. The check counts every alive node of
the cluster: a config may fit only across several nodes, but each replica must fit on one.
"""

from __future__ import annotations

import ray
from ray.serve import Application

from serve_app.api.ingress import Router
from serve_app.config import HEAD_RESOURCE, AppArgs
from serve_app.variant import EmotionModel

_EPS = 1e-9


class ResourceError(ValueError):
    """The config asks for resources the cluster does not have."""


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in resources.items()) + "}"


def _fits(node: dict[str, float], demand: dict[str, float], count: int = 1) -> bool:
    return all(node.get(k, 0.0) + _EPS >= v * count for k, v in demand.items())


def check_resources(args: AppArgs, nodes: list[dict[str, float]]) -> None:
    """Raise ResourceError, naming the fix, if the replicas the args ask for (every Router
    replica, one of every variant) cannot fit on these nodes (each node's total resources):
    the cluster as a whole must have enough, each replica needs a single node that has all it
    asks for, and the Router's placement must be possible."""
    demands, replicas = args.demands(), args.replicas()

    def asked(name: str) -> float:
        return sum(demand.get(name, 0.0) * replicas[d] for d, demand in demands.items())

    have = {}
    for node in nodes:
        for name, amount in node.items():
            have[name] = have.get(name, 0.0) + amount
    gpus = sum(v.num_gpus for v in args.variants.values())
    if gpus > have.get("GPU", 0.0) + _EPS:
        asking = {n: v.num_gpus for n, v in args.variants.items() if v.num_gpus}
        raise ResourceError(
            f"the variants ask for {gpus:g} GPUs {asking} but the cluster has "
            f"{have.get('GPU', 0.0):g}. Deploy configs/cpu.yaml on a machine without GPUs, "
            "configs/single-gpu.yaml to share one GPU, or lower num_gpus in the config's "
            "args.variants")
    if asked("CPU") > have.get("CPU", 0.0) + _EPS:
        raise ResourceError(
            f"the deployments ask for {asked('CPU'):g} CPUs but the cluster has "
            f"{have.get('CPU', 0.0):g}. Lower num_cpus in args.variants (threads can stay "
            "higher: set `threads` in the variant's user_config), or router_replicas")
    custom = {name for demand in demands.values() for name in demand} - {"CPU", "GPU",
                                                                         HEAD_RESOURCE}
    for name in sorted(custom):
        if asked(name) > have.get(name, 0.0) + _EPS:
            raise ResourceError(
                f"the deployments ask for {asked(name):g} of the custom resource {name!r} but "
                f"the cluster's nodes offer {have.get(name, 0.0):g}. Start nodes with it "
                f"(ray start --resources '{{\"{name}\": N}}') or change the resources in args")
    for deployment, demand in demands.items():
        if not any(_fits(node, demand) for node in nodes):
            shapes = sorted({_fmt({k: node.get(k, 0.0) for k in _shown(demand)})
                             for node in nodes})
            raise ResourceError(
                f"one {deployment} replica asks for {_fmt(_shown(demand))} but no single node "
                f"has that much (the nodes offer {', '.join(shapes[:5])}). Lower its "
                "resources in args, or add a node large enough")
    _check_router_placement(args, nodes)


def _shown(demand: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in demand.items() if k != HEAD_RESOURCE}


def _check_router_placement(args: AppArgs, nodes: list[dict[str, float]]) -> None:
    demand, count = args.router_demand(), args.router_replicas
    if args.router_placement == "head":
        heads = [node for node in nodes if HEAD_RESOURCE in node]
        if heads and not _fits(heads[0], demand, count):
            raise ResourceError(
                f"router_placement: head puts the {count} Router replica(s) on the head node, "
                f"which cannot hold {count} x {_fmt(_shown(demand))} (it has "
                f"{_fmt({k: heads[0].get(k, 0.0) for k in _shown(demand)})}). Lower "
                "router_replicas or router_num_cpus, or use router_placement: spread")
    if args.router_placement == "spread":
        room = sum(_fits(node, demand) for node in nodes)
        if room < count:
            raise ResourceError(
                f"router_placement: spread puts the {count} Router replicas on {count} "
                f"different nodes, but {room} node(s) can hold one ({_fmt(demand)}). Lower "
                "router_replicas, or add nodes")


def alive_nodes() -> list[dict[str, float]]:
    """Each alive node's total resources, from the cluster this process belongs to."""
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def build_app(args: dict) -> Application:
    app_args = AppArgs.model_validate(args)
    if app_args.check_resources:
        check_resources(app_args, alive_nodes())
    handles = {
        name: EmotionModel.options(
            name=name,
            ray_actor_options={"num_cpus": res.num_cpus, "num_gpus": res.num_gpus,
                               "resources": dict(res.resources)},
        ).bind(name)
        for name, res in app_args.variants.items()
    }
    return Router.options(**app_args.router_options()).bind(handles)
