"""The KubeRay manifest: generated from deploy.yaml, valid against KubeRay's RayService CRD
schema, and sized so that the cluster it describes holds the variants."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.app import check_resources
from serve_app.config import AppArgs
from serve_app.tools import kuberay
from tests.conftest import REPO

MANIFEST = REPO / "configs" / "kuberay" / "rayservice.yaml"
CRD = REPO / "tests" / "data" / "kuberay" / "ray.io_rayservices.yaml"


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def strict(schema):
    """The CRD schema as the API server applies it with strict field validation (kubectl's
    default): a field the schema does not name is an error, unless it keeps unknown fields."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    return schema


@pytest.fixture(scope="module")
def validator():
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_committed_manifest_is_the_generated_one():
    assert MANIFEST.read_text() == kuberay.render(), (
        f"configs/kuberay/rayservice.yaml is stale: run `{kuberay.GENERATED_BY}`")


def test_manifest_validates_against_the_rayservice_crd(validator):
    service = documents()["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(service)]
    assert not errors, errors
    # The validator does reject what the API server would: a misspelt field, a wrong type.
    broken = copy.deepcopy(service)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 3
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert sorted(e.message for e in validator.iter_errors(broken)) == [
        "0 is not of type 'string'",
        "Additional properties are not allowed ('replica' was unexpected)"]


def test_serve_config_is_deploy_yaml_with_the_documented_overrides():
    deploy = yaml.safe_load((REPO / "deploy.yaml").read_text())
    serve = yaml.safe_load(documents()["RayService"]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)

    def leaves(node, path=()):
        items = node.items() if isinstance(node, dict) else \
            enumerate(node) if isinstance(node, list) else None
        if items is None:
            return {path: node}
        return {k: v for key, value in items for k, v in leaves(value, (*path, key)).items()}

    before, after = leaves(deploy), leaves(serve)
    changed = {path: (before.get(path), after.get(path))
               for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    assert changed == {
        ("proxy_location",): ("HeadOnly", "EveryNode"),
        ("http_options", "host"): ("127.0.0.1", "0.0.0.0"),
        ("applications", 0, "args", "check_resources"): (None, False),
        # Custom heads and jobs on the shared volume, where every pod sees them.
        ("applications", 0, "deployments", 0, "user_config", "heads_dir"):
            ("~/.cache/emotion2vec-serve/heads", "/model-cache/heads"),
        ("applications", 0, "deployments", 0, "user_config", "jobs_dir"):
            ("~/.cache/emotion2vec-serve/jobs", "/model-cache/jobs"),
    }


def test_heads_and_jobs_go_to_the_shared_volume_unless_they_are_uris():
    deploy = yaml.safe_load((REPO / "deploy.yaml").read_text())

    def router_settings(config: dict) -> dict:
        (router,) = [d for d in config["applications"][0]["deployments"]
                     if d["name"] == "Router"]
        return router["user_config"]

    unnamed = copy.deepcopy(deploy)
    for setting in ("heads_dir", "jobs_dir"):
        router_settings(unnamed).pop(setting)
    assert {key: router_settings(kuberay.k8s_serve_config(unnamed))[key]
            for key in ("heads_dir", "jobs_dir")} == {"heads_dir": "/model-cache/heads",
                                                      "jobs_dir": "/model-cache/jobs"}
    buckets = copy.deepcopy(deploy)
    router_settings(buckets).update(heads_dir="s3://team/heads", jobs_dir="gs://team/jobs")
    settings = router_settings(kuberay.k8s_serve_config(buckets))
    assert (settings["heads_dir"], settings["jobs_dir"]) == ("s3://team/heads", "gs://team/jobs")


def test_the_head_mounts_the_shared_volume_for_job_drivers():
    """Ray Jobs run their drivers on the head: a job's driver reads and writes jobs_dir
    there, on the same claim the worker pods mount, at the same path."""
    cluster = documents()["RayService"]["spec"]["rayClusterConfig"]
    claims = []
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"]
                    if m["mountPath"] == kuberay.CACHE_MOUNT]
        claims.append(volumes[mount["name"]]["persistentVolumeClaim"]["claimName"])
    assert set(claims) == {documents()["PersistentVolumeClaim"]["metadata"]["name"]}
    (app,) = yaml.safe_load(documents()["RayService"]["spec"]["serveConfigV2"])["applications"]
    (router,) = [d for d in app["deployments"] if d["name"] == "Router"]
    assert router["user_config"]["jobs_dir"].startswith(kuberay.CACHE_MOUNT + "/")


def test_the_cluster_holds_the_variants():
    """The pods as Ray nodes: the app's own resource check passes on them, the head takes no
    replica, each variant gets a GPU pod of its own."""
    service = documents()["RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert "nvidia.com/gpu" not in str(head)
    assert limits["nvidia.com/gpu"] == 1
    nodes = [{"CPU": float(head["rayStartParams"]["num-cpus"])}] + [
        {"CPU": float(workers["rayStartParams"]["num-cpus"]), "GPU": limits["nvidia.com/gpu"]}
    ] * workers["replicas"]
    assert nodes[0] == {"CPU": 0.0}
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    args = AppArgs.model_validate(app["args"])
    check_resources(args, nodes)
    assert workers["replicas"] == len(args.variants)  # deploy.yaml: one GPU each
    # Ray's CPUs fit inside the pod's, with room for Ray's own processes.
    assert float(limits["cpu"]) >= float(workers["rayStartParams"]["num-cpus"]) + 1
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        workers["template"]["spec"]["tolerations"]


def test_readiness_cache_and_exposure():
    docs = documents()
    spec = docs["RayService"]["spec"]
    serve = yaml.safe_load(spec["serveConfigV2"])
    cluster = spec["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    (container,) = pod["containers"]
    # Readiness is the service's /ready, on the Serve port of the pods that run proxies.
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "serve"}
    assert ports["serve"] == serve["http_options"]["port"]
    assert spec["excludeHeadPodFromServeSvc"] is True
    # The model cache: a claim every GPU pod mounts, where the hub clients download.
    claim = docs["PersistentVolumeClaim"]
    volume, keys_volume = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    mount, keys_mount = container["volumeMounts"]
    # The router's API key file (deploy.yaml's api_keys_file) comes from a Secret.
    (router,) = [d for d in serve["applications"][0]["deployments"] if d["name"] == "Router"]
    keys_file = router["user_config"]["api_keys_file"]
    (item,) = keys_volume["secret"]["items"]
    assert keys_mount["name"] == keys_volume["name"] and keys_mount["readOnly"] is True
    assert f"{keys_mount['mountPath']}/{item['path']}" == keys_file
    env = {item["name"]: item["value"] for item in container["env"]}
    assert mount["name"] == volume["name"]
    assert all(env[key].startswith(mount["mountPath"] + "/") for key in ("MODELSCOPE_CACHE",
                                                                          "HF_HOME"))
    # Every pod's proxy replays requests lost with a Router replica.
    head_env = {e["name"]: e["value"] for e in cluster["headGroupSpec"]["template"]["spec"][
        "containers"][0]["env"]}
    for values in (env, head_env):
        assert values["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == \
            "serve_app.api.failover.proxy_middlewares"
    # Dashboard and metrics on the cluster network only; Ray's token auth on; not root.
    head = cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress")
    assert cluster["authOptions"] == {"mode": "token"}
    for group in (head, workers):
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_router_replicas_go_to_distinct_gpu_pods():
    """Two Router replicas, spread: the GPU pods each have room for one; a placement the
    manifest's cluster cannot hold is refused when the manifest is made."""
    (app,) = yaml.safe_load(documents()["RayService"]["spec"]["serveConfigV2"])["applications"]
    args = AppArgs.model_validate(app["args"])
    assert (args.router_replicas, args.router_placement) == (2, "spread")
    deploy = yaml.safe_load((REPO / "deploy.yaml").read_text())
    for replicas, placement in [(1, "head"), (4, "spread")]:
        broken = copy.deepcopy(deploy)
        broken["applications"][0]["args"].update(router_replicas=replicas,
                                                 router_placement=placement)
        with pytest.raises(ValueError, match="router_placement"):
            kuberay.manifest(broken, "image:1")
