"""The batch job's cluster: joining it, and making sure the job's actors can be placed before
the job starts, so that a cluster without room (a running service holding the CPUs, say)
gets a message that names what is missing instead of a job that waits forever."""

from __future__ import annotations

import ipaddress
import socket

from serve_app.tools.cluster import loopback_env

_EPS = 1e-9
CONNECT_TIMEOUT_S = 5.0


class NoRoom(RuntimeError):
    """The cluster cannot place the job's actors now."""


def connect(address: str | None) -> str:
    """Join the Ray cluster at `address` (`auto`: any cluster running on this machine); without
    one, the cluster that `ray start` made here (or RAY_ADDRESS names), else a new local one on
    127.0.0.1, stopped when the job ends. Says which."""
    host, port = _host_port(address)
    if address is None or _is_loopback(host):
        loopback_env()  # before Ray is imported: Ray would swap 127.0.0.1 for another address
    if port is not None:
        # A wrong address would have Ray retry for minutes: check that something listens.
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise ConnectionError(f"no Ray cluster answers at {address}: {exc}") from None
    import ray

    if address is not None:
        ray.init(address=address, log_to_driver=False)
        return f"joined the Ray cluster at {address}"
    existing = _started_cluster()
    ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    if existing:
        return f"joined the local Ray cluster at {existing}"
    return (f"started a local Ray cluster ({ray.cluster_resources().get('CPU', 0):g} CPUs); "
            "it stops when the job ends")


def _host_port(address: str | None) -> tuple[str | None, int | None]:
    """host and port of a `host:port` address; (None, None) for auto, ray:// and the rest."""
    if not address or "://" in address:
        return None, None
    host, _, port = address.rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else (None, None)


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _started_cluster() -> str | None:
    """The address `ray.init()` will join: RAY_ADDRESS, or the last `ray start` here."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None, None)
    except Exception:  # a private API: only the message depends on it
        return None


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in resources.items()) + "}"


def _free_per_node() -> list[dict[str, float]]:
    try:
        from ray._private.state import available_resources_per_node

        return list(available_resources_per_node().values())
    except Exception:  # a private API: the message is then less precise, nothing else
        return []


def describe_shortage(bundles: list[dict[str, float]], free: dict[str, float],
                      total: dict[str, float], nodes: list[dict[str, float]]) -> str:
    """What the job asks for, what the cluster has free, and what is missing."""
    need: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            need[name] = need.get(name, 0.0) + amount
    missing = {name: amount - free.get(name, 0.0) for name, amount in need.items()
               if amount > free.get(name, 0.0) + _EPS}
    engines = len(bundles) - 1
    asked = (f"the job needs {_fmt(need)} ({engines} engine actor(s) x {_fmt(bundles[0])} and "
             f"a decode task {_fmt(bundles[-1])}); the cluster has "
             f"{_fmt({name: free.get(name, 0.0) for name in need})} free of "
             f"{_fmt({name: total.get(name, 0.0) for name in need})}")
    if missing:
        where = f"missing {_fmt(missing)}"
    else:
        shapes = sorted({_fmt({name: node.get(name, 0.0) for name in need}) for node in nodes})
        where = (f"enough in all, but no node has {_fmt(bundles[0])} free for one engine"
                 + (f" (free per node: {', '.join(shapes[:5])})" if shapes else ""))
    return (f"{asked}: {where}. Lower --num-cpus, --num-gpus, --concurrency or --decode-cpus, "
            "or free those resources (a running service holds some of them)")


def check_room(bundles: list[dict[str, float]], timeout_s: float) -> None:
    """Reserve the job's starting resources (a placement group) and let them go again; NoRoom,
    naming what is missing, if they cannot be had within `timeout_s` (an autoscaling cluster
    may add nodes meanwhile)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group(bundles)
    try:
        if group.wait(timeout_seconds=timeout_s):
            return
        free, total = ray.available_resources(), ray.cluster_resources()
    finally:
        remove_placement_group(group)
    raise NoRoom(describe_shortage(bundles, free, total, _free_per_node()))
