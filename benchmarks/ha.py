"""Node loss with 1 and with 2 Router replicas: requests lost, time until every variant serves
again, and a key's accepted rate against its quota.

For each router count it starts a cluster of its own on 127.0.0.1 (ray.cluster_utils: a head
with the proxy, two workers that each hold a Router slot and a model slot, and a spare worker
added once the app runs), deploys the tiny config's base and large there with the Routers
spread over the workers, then:
1. quota: two clients call /v1/rollouts with a key of `--rpm` requests a minute (a 1 s quota
   window) about ten times faster than it allows, and count what is admitted over `--quota-s`
   seconds once the first burst is spent;
2. node loss: `--clients` clients post predict (base and large in turn) with a key without
   limits; after a few seconds the worker holding a Router replica (and a variant) is removed;
   every answer is counted until each variant has answered again from a live node.

    python -m benchmarks.ha --routers 1 2 --clients 4 --quota-s 60
    python -m benchmarks.ha --routers 1 2 --quota-s 0 --no-replay   # Serve's proxy alone

`--no-replay` leaves out the proxy middleware that sends a request lost with its Router replica
once more (serve_app/api/failover.py), to see what Ray Serve's proxy does by itself.
Lost nodes are declared dead after ~3 s here (health checks every 1 s, 3 misses); Ray's
default is 5 misses of a 3 s check: add --default-node-death to measure with it.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.results import add_results_dir, write_result
from serve_app.api import failover
from serve_app.tools.cli import new_key
from serve_app.tools.cluster import LocalServe, load_app, local_cluster

REPO = Path(__file__).resolve().parents[1]
APP = "emotion2vec"
VARIANTS = ("base", "large")
HEAD = {"num_cpus": 1}
WORKER = {"num_cpus": 1, "resources": {"router_slot": 1, "model_slot": 1}}
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
MODEL_TIMEOUT_S = 120
HTTP_TIMEOUT_S = MODEL_TIMEOUT_S + 60


@dataclass
class Keys:
    """Two API keys: `load` without limits, `metered` with a request quota."""

    rpm: int
    secrets: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        import yaml

        for key_id, rpm in (("load", None), ("metered", self.rpm)):
            self.secrets[key_id], line = new_key(key_id, rpm, None)
            self.config.update(yaml.safe_load(line))

    def headers(self, key_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[key_id]}"}


def ha_app(root: Path, routers: int, keys: Keys, placement: str = "spread") -> dict:
    """The tiny config's base and large, one per worker's model slot, and `routers` Router
    replicas on the workers' router slots (the head holds the proxy only)."""
    app = load_app(REPO / "configs" / "tiny.yaml", root)
    app["args"] = {
        "router_num_cpus": 0.05, "router_resources": {"router_slot": 0.01},
        "router_replicas": routers, "router_placement": placement,
        "vad_num_cpus": None,  # no VAD: nothing here segments a recording
        "variants": {v: {"num_cpus": 0.2, "resources": {"model_slot": 1}} for v in VARIANTS}}
    app["deployments"] = [d for d in app["deployments"] if d["name"] in {*VARIANTS, "Router"}]
    for deployment in app["deployments"]:
        if deployment["name"] == "Router":
            deployment["user_config"] = {
                "default_version": "base", "model_timeout_s": MODEL_TIMEOUT_S,
                "decode_workers": 0, "api_keys": keys.config, "quota_window_s": 1}
    return app


def router_nodes() -> dict[str, str]:
    """Router replica actor name -> the id of the node it runs on."""
    import ray

    nodes = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(f"SERVE_REPLICA::{APP}#Router#"):
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            nodes[entry["name"]] = ray.get(actor.__ray_call__.remote(
                lambda _: ray.get_runtime_context().get_node_id()), timeout=30)
    return nodes


def variants(http: httpx.Client, keys: Keys) -> dict[str, dict]:
    return http.get("/v1/models", headers=keys.headers("load")).json()["variants"]


def accepted_per_minute(url: str, keys: Keys, seconds: float, clients: int = 2) -> dict:
    """Calls at ~10x the metered key's quota: after its first burst is spent, the 200s over
    `seconds`, per minute."""
    pace = 60 / keys.rpm / 10 * clients  # each client's pause between calls
    counts: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + seconds + 60
        with httpx.Client(base_url=url, timeout=30, headers=keys.headers("metered")) as http:
            for _ in range(100_000):  # bounded by count and time
                if time.monotonic() > deadline or counts["stop"]:
                    return
                try:
                    status = http.get("/v1/rollouts").status_code
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    return
                if status == 429:
                    start.set()
                with lock:
                    counts[(start.is_set(), status)] += 1
                time.sleep(pace)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait(timeout=60)
    before = counts[(True, 200)]
    time.sleep(seconds)
    admitted = counts[(True, 200)] - before
    counts["stop"] = 1
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise RuntimeError(f"quota clients failed: {errors[:3]}")
    return {"rpm": keys.rpm, "admitted_per_min": admitted * 60 / seconds,
            "ratio": admitted * 60 / seconds / keys.rpm,
            "refused": counts[(True, 429)], "other": {k: v for k, v in counts.items()
                                                      if k != "stop" and k[1] not in (200, 429)}}


@dataclass
class Answer:
    sent_at: float
    done_at: float
    variant: str
    status: int | str
    retry_after: str | None
    code: str | None


class Load:
    """Clients posting predict in a closed loop (base and large in turn) until stopped."""

    def __init__(self, url: str, clip: Path, keys: Keys, clients: int):
        self.url, self.body, self.keys = url, clip.read_bytes(), keys
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(VARIANTS[i % 2],))
                        for i in range(clients)]

    def _client(self, variant: str) -> None:
        deadline = time.monotonic() + 600
        with httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT_S,
                          headers=self.keys.headers("load")) as http:
            for _ in range(100_000):  # bounded by count and time
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                sent_at = time.monotonic()
                try:
                    response = http.post("/v1/predict", data={"model_version": variant},
                                         files={"file": ("c.wav", self.body)})
                except httpx.HTTPError as exc:  # a timeout included: must not happen
                    self.errors.append(f"{variant}: {exc!r}")
                    return
                code = None
                if response.status_code != 200:
                    try:
                        code = response.json()["error"]["code"]
                    except ValueError:
                        code = f"not JSON: {response.text[:60]!r}"
                self.answers.append(Answer(sent_at, time.monotonic(), variant,
                                           response.status_code,
                                           response.headers.get("retry-after"), code))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=HTTP_TIMEOUT_S + 10)


def lose_a_router_node(serve: LocalServe, load: Load, keys: Keys, timeout_s: float = 240
                       ) -> dict:
    """Remove the worker that holds a Router replica and base (or, with one Router, the
    Router's), under `load`; wait until every variant is ready on a live node and has answered
    200 since. Timings are from the removal."""
    http = httpx.Client(base_url=serve.url, timeout=30)
    routers = router_nodes()
    infos = variants(http, keys)
    base_node = infos["base"]["node"]["id"]
    lost = base_node if base_node in routers.values() else next(iter(routers.values()))
    held = sorted(v for v, info in infos.items() if info["node"]["id"] == lost)
    (node,) = [n for n in serve.nodes.worker_nodes if n.node_id == lost]
    time.sleep(3.0)  # the load runs before the loss
    removed_at = time.monotonic()
    serve.nodes.remove_node(node)
    ready_at = None
    deadline = removed_at + timeout_s
    while time.monotonic() < deadline:
        try:
            infos = variants(http, keys)
        except (httpx.HTTPError, ValueError, KeyError):
            infos = {}
        if infos and all(i.get("state") == "ready" and i["node"]["id"] != lost
                         for i in infos.values()):
            ready_at = ready_at or time.monotonic()
            served = {a.variant for a in load.answers if a.status == 200 and a.sent_at > ready_at}
            if served == set(VARIANTS):
                break
        time.sleep(0.5)
    else:
        raise TimeoutError(f"the variants never all served again: {infos}")
    back_at = time.monotonic()
    http.close()
    during = [a for a in load.answers if a.sent_at >= removed_at - 60]
    statuses = Counter((a.status, a.code) for a in during if a.sent_at <= back_at)
    return {"lost_node_held": ["Router", *held], "statuses": dict(statuses),
            "lost": sum(n for (status, _), n in statuses.items() if status != 200),
            "no_retry_after": sum(1 for a in during if a.status == 503 and not a.retry_after),
            "back_s": back_at - removed_at, "ready_s": (ready_at or back_at) - removed_at,
            "no_200_s": {v: longest_gap(load.answers, v, removed_at, back_at)
                         for v in VARIANTS},
            "replayed": proxy_log_count(serve, "was lost with the replica"),
            "routers_left": len(router_nodes())}


def longest_gap(answers: list[Answer], variant: str, start: float, end: float) -> float:
    """The longest time within [start, end] in which no 200 of `variant` came back."""
    times = sorted(a.done_at for a in answers if a.variant == variant and a.status == 200
                   and start <= a.done_at <= end)
    edges = [start, *times, end]
    return max(b - a for a, b in itertools.pairwise(edges))


def proxy_log_count(serve: LocalServe, text: str) -> int:
    """Distinct lines of the proxies' logs that contain `text`."""
    pattern = os.path.join(serve.temp_dir, "**", "logs", "serve", "proxy_*.log")
    return len({line for path in glob.glob(pattern, recursive=True)
                for line in Path(path).read_text(errors="replace").splitlines()
                if text in line})


def run(routers: int, clients: int, quota_s: float, rpm: int, fast: bool) -> dict:
    """One cluster: the quota phase (quota_s 0: none), then the node loss."""
    import tempfile

    from tests import clips as clip_maker

    keys = Keys(rpm)
    with tempfile.TemporaryDirectory(prefix="ha-") as tmp, \
            local_cluster(HEAD, [WORKER, WORKER],
                          system_config=FAST_NODE_DEATH if fast else None) as serve:
        root = Path(tmp)
        clip = clip_maker.write(root / "tone.wav", clip_maker.tone(2.0, 16_000), 16_000)
        serve.put(ha_app(root, routers, keys))
        status = serve.wait_for(APP, ("RUNNING", "DEPLOY_FAILED"), timeout_s=600)
        if status.status != "RUNNING":
            raise SystemExit(f"deploy failed: {status}")
        serve.nodes.add_node(node_ip_address="127.0.0.1", include_dashboard=False, **WORKER)
        quota = accepted_per_minute(serve.url, keys, quota_s) if quota_s else None
        with Load(serve.url, clip, keys, clients) as load:
            loss = lose_a_router_node(serve, load, keys)
        if load.errors:
            loss["client_errors"] = load.errors[:5]
        return {"routers": routers, "quota": quota, "loss": loss}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--quota-s", type=float, default=60.0)
    parser.add_argument("--rpm", type=int, default=120)
    parser.add_argument("--default-node-death", action="store_true")
    parser.add_argument("--no-replay", action="store_true",
                        help="without the proxy middleware (serve_app/api/failover.py)")
    return add_results_dir(parser)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.no_replay:  # before Ray starts: the proxy reads it once
        os.environ[failover.ENV_VAR] = ""
    results = [run(n, args.clients, args.quota_s, args.rpm, not args.default_node_death)
               for n in args.routers]
    print(f"\nreplay: {'off' if args.no_replay else 'on'}; lost node declared dead after "
          f"{'~15-60 s (Ray default)' if args.default_node_death else '~3 s'}")
    print(f"{'routers':>7} {'quota rpm':>9} {'admitted/min':>12} {'ratio':>5} | "
          f"{'answers':>7} {'lost':>4} {'replayed':>8} {'all back s':>10} "
          f"{'no 200 s (base, large)':>22}  statuses")
    for result in results:
        quota, loss = result["quota"] or {}, result["loss"]
        gaps = ", ".join(f"{loss['no_200_s'][v]:.1f}" for v in VARIANTS)
        print(f"{result['routers']:>7} {quota.get('rpm', '-'):>9} "
              f"{quota.get('admitted_per_min', 0):>12.1f} {quota.get('ratio', 0):>5.2f} | "
              f"{sum(loss['statuses'].values()):>7} {loss['lost']:>4} {loss['replayed']:>8} "
              f"{loss['back_s']:>10.1f} {gaps:>22}  {loss['statuses']}")
    for result in results:
        print(result)
    rows = []
    for result in results:
        loss = result["loss"]
        lost = {status: n for status, n in loss["statuses"].items() if status != 200}
        rows.append({"routers": result["routers"], "replay": not args.no_replay,
                     "quota": result["quota"],
                     "runs": [{"answers": sum(loss["statuses"].values()), "lost": loss["lost"],
                               "lost_as": ", ".join(f"{n} x {status}"
                                                    for status, n in lost.items()) or None,
                               "replayed": loss["replayed"], "back_s": round(loss["back_s"], 1),
                               "no_200_s": {v: round(loss["no_200_s"][v], 1)
                                            for v in VARIANTS}}]})
    write_result("ha", {"benchmark": "ha", "rows": rows}, results_dir=args.results_dir,
                 config=f"configs/tiny.yaml's {' and '.join(VARIANTS)} on a 4-node local "
                        f"cluster, {args.clients} clients",
                 argv=["benchmarks/ha.py", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
