"""The KubeRay RayService manifest, generated from deploy.yaml (one source of truth):

    python -m serve_app.tools.kuberay > configs/kuberay/rayservice.yaml

`serveConfigV2` is deploy.yaml's Serve config with exactly the overrides of `k8s_serve_config`
(proxies on every pod that has a replica, listening on the pod's address; no resource check at
build time; the Router's heads_dir and jobs_dir on the shared volume unless they are URIs). The
cluster is sized from the config's args: a head without GPUs that runs no replicas, and one GPU
worker pod per GPU the variants ask for, each big enough for its share of the variants plus the
router. A ReadWriteMany volume holds the model cache, the custom heads and the jobs; the head
mounts it too (Ray Jobs run their drivers there).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tomllib
from pathlib import Path, PurePosixPath

import yaml

from serve_app.api import failover
from serve_app.config import AppArgs

REPO = Path(__file__).resolve().parents[2]
NAME = "emotion2vec"
RAY_VERSION = "2.60.0"  # pyproject.toml pins ray[serve]==2.60.*
UID = 1000  # the Dockerfile's user
CACHE_CLAIM = f"{NAME}-model-cache"
CACHE_MOUNT = "/model-cache"
CACHE_SIZE = "20Gi"  # base and large from the hub are ~3.1 GB; room for revisions
VARIANT_MEMORY_GI = 16  # large through FunASR's loader peaks at ~3x its 1.95 GB file
HEAD = {"cpu": "2", "memory": "8Gi"}  # GCS, Serve controller, dashboard: no replicas
SYSTEM_CPUS = 1  # per worker pod, beyond what Ray hands out: raylet, proxy, agent
GENERATED_BY = "python -m serve_app.tools.kuberay > configs/kuberay/rayservice.yaml"
KEYS_SECRET = f"{NAME}-api-keys"  # kubectl create secret generic ... --from-file=<file name>
# Every pod's proxy replays requests lost with a Router replica (serve_app/api/failover.py).
PROXY_ENV = [{"name": failover.ENV_VAR, "value": failover.IMPORT_PATH}]


def k8s_serve_config(config: dict) -> dict:
    """deploy.yaml's Serve config with the Kubernetes overrides, and no other change."""
    config = copy.deepcopy(config)
    # A proxy on every pod that has a replica: the serve Service spreads traffic over the
    # GPU pods (the head is left out of it), instead of funnelling it through the head.
    config["proxy_location"] = "EveryNode"
    # The pod's own address: the serve Service reaches the proxies; the Service is ClusterIP,
    # so nothing outside the cluster does.
    config["http_options"]["host"] = "0.0.0.0"
    for app in config["applications"]:
        # GPU workers join after the head, and KubeRay submits a config once: a check at build
        # time could see no GPUs yet and fail the deploy for good. Serve waits for them instead.
        app["args"]["check_resources"] = False
        # Custom heads and jobs where every pod sees them: the shared volume, unless the
        # config names an object store.
        for deployment in app.get("deployments", []):
            settings = deployment.get("user_config") or {}
            if deployment["name"] != "Router":
                continue
            for setting, folder in (("heads_dir", "heads"), ("jobs_dir", "jobs")):
                if "://" not in settings.get(setting, ""):
                    settings[setting] = f"{CACHE_MOUNT}/{folder}"
    return config


def default_image() -> str:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return f"emotion2vec-serve:{version}"


def _security() -> tuple[dict, dict]:
    pod = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID}
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    return pod, container


def _head_group(image: str) -> dict:
    pod_security, container_security = _security()
    # Ray Jobs run their drivers on the head: a job's driver (POST /v1/jobs) reads and
    # writes jobs_dir on the shared volume, as the Router replicas and the engines do.
    return {
        "serviceType": "ClusterIP",  # dashboard and metrics on the cluster network only
        "rayStartParams": {
            "num-cpus": "0",  # no replicas on the head: they go to the worker pods
            "dashboard-host": "0.0.0.0",  # the operator submits serveConfigV2 through it
            "metrics-export-port": "8080",
        },
        "template": {"spec": {
            "securityContext": pod_security,
            "containers": [{
                "name": "ray-head",
                "image": image,
                "securityContext": container_security,
                "env": copy.deepcopy(PROXY_ENV),
                "volumeMounts": [{"name": "model-cache", "mountPath": CACHE_MOUNT}],
                "resources": {"requests": dict(HEAD), "limits": dict(HEAD)},
                "ports": [{"name": "gcs-server", "containerPort": 6379},
                          {"name": "dashboard", "containerPort": 8265},
                          {"name": "client", "containerPort": 10001},
                          {"name": "metrics", "containerPort": 8080}],
            }],
            "volumes": [{"name": "model-cache",
                         "persistentVolumeClaim": {"claimName": CACHE_CLAIM}}],
        }},
    }


def _keys_file(config: dict) -> PurePosixPath | None:
    """The Router's api_keys_file, if the config names one."""
    for app in config["applications"]:
        for deployment in app.get("deployments", []):
            if deployment["name"] == "Router" and deployment.get("user_config", {}).get(
                    "api_keys_file"):
                return PurePosixPath(deployment["user_config"]["api_keys_file"])
    return None


def _worker_group(image: str, args: AppArgs, serve_port: int,
                  keys_file: PurePosixPath | None) -> dict:
    gpus = sum(v.num_gpus for v in args.variants.values())
    pods = max(1, math.ceil(gpus - 1e-9))  # one GPU per pod
    per_pod = math.ceil(len(args.variants) / pods)
    if args.router_placement == "head" or args.router_replicas > pods:
        # Each pod has room for one Router replica; the head takes none (num-cpus 0).
        raise ValueError(f"the manifest runs Router replicas on the {pods} GPU pods, one each "
                         f"at most: set router_placement to spread (or any) and router_replicas "
                         f"to {pods} or fewer (now {args.router_placement}, "
                         f"{args.router_replicas})")
    # The pod's share of the variants, plus the router (the head takes none).
    ray_cpus = math.ceil(per_pod * max(v.num_cpus for v in args.variants.values())
                         + args.router_num_cpus - 1e-9)
    cpu = str(ray_cpus + SYSTEM_CPUS)
    memory = f"{VARIANT_MEMORY_GI * per_pod}Gi"
    pod_security, container_security = _security()
    volumes = [{"name": "model-cache", "persistentVolumeClaim": {"claimName": CACHE_CLAIM}}]
    mounts = [{"name": "model-cache", "mountPath": CACHE_MOUNT}]
    if keys_file is not None:
        # The router (on a worker pod) reads its API keys from a Secret, never from the image.
        volumes.append({"name": "api-keys", "secret": {
            "secretName": KEYS_SECRET, "items": [{"key": keys_file.name, "path": keys_file.name}]}})
        mounts.append({"name": "api-keys", "mountPath": str(keys_file.parent),
                       "readOnly": True})
    return {
        "groupName": "gpu",
        "replicas": pods, "minReplicas": pods, "maxReplicas": pods,
        "rayStartParams": {"num-cpus": str(ray_cpus)},
        "template": {"spec": {
            "securityContext": pod_security,
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                             "effect": "NoSchedule"}],
            "volumes": volumes,
            "containers": [{
                "name": "ray-worker",
                "image": image,
                "securityContext": container_security,
                "env": [{"name": "MODELSCOPE_CACHE", "value": f"{CACHE_MOUNT}/modelscope"},
                        {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/huggingface"},
                        *copy.deepcopy(PROXY_ENV)],
                "volumeMounts": mounts,
                "resources": {
                    "requests": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": 1},
                    "limits": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": 1},
                },
                "ports": [{"name": "serve", "containerPort": serve_port}],
                # In the serve Service only while every variant is ready (asked through this
                # pod's proxy); KubeRay's own liveness probe stays.
                "readinessProbe": {
                    "httpGet": {"path": "/ready", "port": "serve"},
                    "initialDelaySeconds": 10, "periodSeconds": 5, "timeoutSeconds": 5,
                    "failureThreshold": 3,
                },
            }],
        }},
    }


def manifest(deploy: dict, image: str | None = None) -> list[dict]:
    """The Kubernetes objects: the model cache's claim, then the RayService."""
    serve = k8s_serve_config(deploy)
    (app,) = serve["applications"]
    args = AppArgs.model_validate(app["args"])
    image = image or default_image()
    claim = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": CACHE_CLAIM},
        # Shared by every GPU pod, kept across pod restarts, rescheduling and cluster upgrades:
        # each model is downloaded once. Needs a storage class that offers ReadWriteMany.
        "spec": {"accessModes": ["ReadWriteMany"],
                 "resources": {"requests": {"storage": CACHE_SIZE}}},
    }
    service = {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": NAME},
        "spec": {
            "upgradeStrategy": {"type": "NewCluster"},
            "excludeHeadPodFromServeSvc": True,
            "serveConfigV2": yaml.safe_dump(serve, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "authOptions": {"mode": "token"},  # Ray's token auth, as outside Kubernetes
                "headGroupSpec": _head_group(image),
                "workerGroupSpecs": [_worker_group(image, args, serve["http_options"]["port"],
                                                   _keys_file(serve))],
            },
        },
    }
    return [claim, service]


class _Dumper(yaml.SafeDumper):
    pass


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None  # serveConfigV2 reads as the config file it is
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def render(deploy_path: Path = REPO / "deploy.yaml", image: str | None = None) -> str:
    deploy = yaml.safe_load(Path(deploy_path).read_text())
    header = (f"# Generated from {Path(deploy_path).name} by `python -m serve_app.tools.kuberay` "
              "(serve_app/tools/kuberay.py):\n# edit those, then generate this file again.\n")
    return header + yaml.dump_all(manifest(deploy, image), Dumper=_Dumper, sort_keys=False,
                                  explicit_start=True, width=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the KubeRay RayService manifest.")
    parser.add_argument("--config", type=Path, default=REPO / "deploy.yaml",
                        help="the Serve config to embed (default: deploy.yaml)")
    parser.add_argument("--image", help=f"the pods' image (default: {default_image()}, "
                                        "built from the Dockerfile)")
    args = parser.parse_args(argv)
    sys.stdout.write(render(args.config, args.image))


if __name__ == "__main__":
    main()
