"""The service on several Ray nodes (ray.cluster_utils.Cluster, every node on 127.0.0.1):
variants placed on worker nodes, requests across nodes, a hot swap on a worker node, the
resource check over the whole cluster, a batch job with engines on several nodes, and a node
lost under load.

Its own pytest process (one driver joins one cluster): `pytest tests/multinode`. One cluster
for the module: a head with the proxy and the router, three workers with one model slot each
(two variants, one spare node for a variant that loses its node)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from serve_app.audio import sndfile
from serve_app.heads import headfile
from serve_app.tools.batch.parts import read_rows
from serve_app.tools.cluster import local_cluster
from tests import clips as clip_maker
from tests.conftest import tiny_app
from tests.head_files import head_bytes
from tests.traffic import Traffic
from tests.waiting import eventually

APP = "emotion2vec"
VARIANTS = ("base", "large")
HEAD = {"num_cpus": 1, "resources": {"ingress": 1}}
WORKER = {"num_cpus": 1, "resources": {"model_slot": 1}}
# A lost node is declared dead after about 3 s instead of Ray's default 15 s.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
# Requests wait for a variant's replica up to the router's model_timeout_s: long enough here
# for a replica to start again on another node of this busy machine.
MODEL_TIMEOUT_S = 120
HTTP_TIMEOUT_S = MODEL_TIMEOUT_S + 30  # a request that hangs fails here


def tiny(root: Path, seed: int) -> dict:
    return {"source": str(root / f"tiny-seed{seed}"), "generate": {"arch": "tiny", "seed": seed}}


def make_app(root: Path, name: str = APP, prefix: str = "/", args: dict | None = None,
             **sources: dict) -> dict:
    """The tiny config; by default base and large pinned to worker nodes and the router to the
    head. `sources`: variant -> user_config updates."""
    app = tiny_app(root)
    app.update(name=name, route_prefix=prefix)
    app["args"] = args or {
        "router_num_cpus": 0.05, "router_resources": {"ingress": 0.01},
        "variants": {v: {"num_cpus": 0.2, "resources": {"model_slot": 1}} for v in VARIANTS}}
    # No VAD deployment: these tests place exact CPUs per node, and none segments a recording.
    app["args"].setdefault("vad_num_cpus", None)
    variants = set(app["args"]["variants"])
    app["deployments"] = [d for d in app["deployments"] if d["name"] in {*variants, "Router"}]
    for deployment in app["deployments"]:
        if deployment["name"] == "Router":
            deployment["user_config"] = {"default_version": sorted(variants)[0],
                                         "model_timeout_s": MODEL_TIMEOUT_S,
                                         "heads_dir": str(root / "heads")}
        elif deployment["name"] in sources:
            deployment["user_config"] = {**deployment["user_config"],
                                         **sources[deployment["name"]]}
    return app


class MultiNode:
    def __init__(self, serve, root: Path, clip: Path):
        self.serve, self.root, self.clip = serve, root, clip
        self.http = httpx.Client(base_url=serve.url, timeout=HTTP_TIMEOUT_S)

    def worker(self, node_id: str):
        (node,) = [n for n in self.serve.nodes.worker_nodes if n.node_id == node_id]
        return node

    @property
    def worker_ids(self) -> set[str]:
        return {node.node_id for node in self.serve.nodes.worker_nodes}

    def predict(self, variant: str, clip: Path | None = None, **fields) -> httpx.Response:
        clip = clip or self.clip
        return self.http.post("/v1/predict", files={"file": (clip.name, clip.read_bytes())},
                              data={"model_version": variant, **fields})

    def variants(self) -> dict[str, dict]:
        return self.http.get("/v1/models").json()["variants"]

    def wait(self, variant: str, condition, timeout_s: float = 120) -> dict:
        """The variant's /v1/models entry, once condition(entry) holds."""
        def met() -> dict:
            info = self.variants()[variant]
            assert condition(info), info
            return info

        return eventually(met, f"{variant} meeting the condition", timeout_s, interval_s=0.5)


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    clip = clip_maker.write(tmp_path_factory.mktemp("clips") / "tone.wav",
                            clip_maker.tone(2.0, 16_000), 16_000)
    with local_cluster(HEAD, [WORKER] * 3, system_config=FAST_NODE_DEATH) as serve:
        serve.put(initial_app(root))
        status = serve.wait_for(APP, ("RUNNING", "DEPLOY_FAILED"))
        assert status.status == "RUNNING", status
        handle = MultiNode(serve, root, clip)
        yield handle
        handle.http.close()


def initial_app(root: Path) -> dict:
    return make_app(root, base=tiny(root, 1), large=tiny(root, 2))


def funasr_scores(directory: Path, waveform: np.ndarray) -> list[float]:
    from funasr import AutoModel

    model = AutoModel(model=str(directory), device="cpu", ncpu=1, disable_update=True,
                      disable_pbar=True)
    return model.generate(waveform)[0]["scores"]


def test_variants_run_on_worker_nodes_and_answer_across_nodes(multi, tmp_path):
    variants = multi.variants()
    nodes = {name: variants[name]["node"]["id"] for name in VARIANTS}
    assert set(nodes.values()) <= multi.worker_ids and len(set(nodes.values())) == 2, nodes
    # 20 s of audio is 1.3 MB as float32: it travels through the object store, from the
    # router on the head to the worker, and the frame embeddings travel back.
    samples = clip_maker.tone(20.0, 16_000, 190.0, 7)
    long_clip = clip_maker.write(tmp_path / "long.wav", samples, 16_000)
    waveform = sndfile.decode(long_clip.read_bytes(), max_duration_s=60,
                            min_duration_s=0.1).waveform
    for variant, seed in zip(VARIANTS, (1, 2)):
        response = multi.predict(variant, long_clip, granularity="frame",
                                   extract_embedding="true")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_version"] == variant
        assert np.asarray(body["embedding"]).shape == (999, 64)
        expected = funasr_scores(multi.root / f"tiny-seed{seed}", waveform)
        assert np.abs(np.array(list(body["scores"].values())) - expected).max() <= 1e-5


def test_custom_heads_are_served_by_replicas_on_two_nodes(multi):
    """A head per variant's checkpoint, registered through the router on the head node; each
    variant's replica, on its own worker node, reads it from heads_dir and serves it."""
    variants = multi.variants()
    assert len({variants[v]["node"]["id"] for v in VARIANTS}) == 2
    for seed, variant in enumerate(VARIANTS):
        info = variants[variant]
        data = head_bytes(f"calls-{variant}", info["sha256"], info["embedding_dim"], seed=seed)
        stored = multi.http.put(f"/v1/heads/calls-{variant}", content=data)
        assert stored.status_code == 201, stored.text
        plain = multi.predict(variant, extract_embedding="true").json()
        answer = multi.predict(variant, head=f"calls-{variant}")
        assert answer.status_code == 200, answer.text
        assert answer.json()["head"] == stored.json()
        head = headfile.decode(data, 1 << 24)
        expected = head.scores(head.logits(np.array([plain["embedding"]]))[0], range(3))
        np.testing.assert_allclose(list(answer.json()["scores"].values()), expected, atol=1e-5)
        assert multi.variants()[variant]["heads"]["loads"] >= 1


def test_hot_swap_on_a_variant_on_a_worker_node(multi):
    before = multi.variants()["large"]
    assert before["node"]["id"] in multi.worker_ids
    old = multi.predict("large").json()["scores"]
    multi.serve.put(make_app(multi.root, base=tiny(multi.root, 1), large=tiny(multi.root, 22)))
    try:
        after = multi.wait("large", lambda i: (i["last_swap"] or {}).get("result") == "ok")
        # Swapped in place: same process on the same node, the new checkpoint written there.
        assert (after["pid"], after["node"], after["load_count"]) == (
            before["pid"], before["node"], before["load_count"] + 1)
        assert after["source"] == "tiny-seed22"  # clients see the directory by name
        new = multi.predict("large")
        assert new.status_code == 200 and new.json()["scores"] != old
    finally:  # large's first checkpoint again, for the other tests
        multi.serve.put(initial_app(multi.root))
        multi.wait("large", lambda i: i["state"] == "ready" and i["source"] == "tiny-seed2")


def test_resource_check_counts_the_whole_cluster(multi):
    base = {"base": tiny(multi.root, 1)}
    # 1.8 CPUs: more than any node has (1), less than the cluster (4): deploys across nodes.
    across = make_app(multi.root, "across", "/across",
                      args={"router_num_cpus": 0.9, "variants": {"base": {"num_cpus": 0.9}}},
                      **base)
    # 1.5 CPUs in one replica: the cluster has 4, but no node could ever hold it.
    nowhere = make_app(multi.root, "nowhere", "/nowhere",
                       args={"router_num_cpus": 0.05, "variants": {"base": {"num_cpus": 1.5}}},
                       **base)
    multi.serve.put(across, nowhere)
    try:
        assert multi.serve.wait_for("across", ("RUNNING", "DEPLOY_FAILED")).status == "RUNNING"
        response = multi.http.post("/across/v1/predict", files={
            "file": ("c.wav", multi.clip.read_bytes())})
        assert response.status_code == 200, response.text
        status = multi.serve.wait_for("nowhere", ("RUNNING", "DEPLOY_FAILED"), timeout_s=120)
        assert status.status == "DEPLOY_FAILED"
        assert "one base replica asks for {CPU: 1.5} but no single node" in status.message
    finally:
        multi.serve.remove("across", "nowhere")


def test_a_batch_job_with_engines_on_several_nodes(multi, tmp_path):
    """`emotion2vec-serve batch` joins this cluster: three engine actors that no node can hold
    two of (0.6 CPU each, 1 CPU per node), the decoding in tasks beside them; rows equal the
    service's answers."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"applications": [
        make_app(multi.root, base=tiny(multi.root, 1), large=tiny(multi.root, 2))]}))
    folder = tmp_path / "archive"
    folder.mkdir()
    for index in range(24):
        clip_maker.write(folder / f"{index:02d}.wav",
                         clip_maker.tone(1.0 + index / 8, 16_000, 150 + 10 * index, index),
                         16_000)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.tools.cli", "batch", str(folder), "--out", str(out),
         "--config", str(config), "--address", multi.serve.nodes.address, "--model-version",
         "base", "--num-cpus", "0.6", "--concurrency", "3", "--decode-cpus", "0.2",
         "--files-per-task", "2", "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = read_rows(out).to_pylist()
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in folder.iterdir())
    assert {row["status"] for row in rows} == {"ok"}
    nodes = {row["node_id"] for row in rows}
    assert len(nodes) >= 2, nodes  # the pool's actors ran on several nodes
    for row in rows[:3]:
        body = multi.predict("base", Path(row["path"])).json()
        scores = [row[f"score_{name}"] for name in body["scores"]]
        assert np.abs(np.subtract(scores, list(body["scores"].values()))).max() <= 1e-4


@pytest.fixture
def nodes_restored(multi):
    """A test that removes worker nodes gets them replaced afterwards (as spares)."""
    workers = len(multi.serve.nodes.worker_nodes)
    yield
    for _ in range(workers - len(multi.serve.nodes.worker_nodes)):
        multi.serve.nodes.add_node(node_ip_address="127.0.0.1", include_dashboard=False,
                                   **WORKER)


def test_a_node_lost_under_load(multi, nodes_restored):
    """Only 200 or 503 (with Retry-After) while base's node goes away, none hangs, large is
    untouched, and base comes back on the spare worker."""
    infos = multi.variants()
    lost = infos["base"]["node"]["id"]
    spare = multi.worker_ids - {lost, infos["large"]["node"]["id"]}
    variant_of = ("base", "base", "base", "large")  # what each sender asks for

    def send(http: httpx.Client, sender: int, _number: int) -> httpx.Response:
        return http.post("/v1/predict", data={"model_version": variant_of[sender]},
                         files={"file": ("c.wav", multi.clip.read_bytes())})

    # A request that hangs ends at HTTP_TIMEOUT_S as a transport error: a failure.
    with Traffic(multi.serve.url, send, senders=len(variant_of), max_s=240,
                 timeout_s=HTTP_TIMEOUT_S) as traffic:
        traffic.wait_for(4)
        removed_at = time.monotonic()
        multi.serve.nodes.remove_node(multi.worker(lost))
        back = multi.wait("base", lambda i: i.get("state") == "ready"
                          and i["node"]["id"] != lost, timeout_s=180)
        back_at = time.monotonic()
        traffic.wait_for(2, since=back_at,  # answers from the new replica
                         where=lambda o: variant_of[o.sender] == "base")
    assert not [o for o in traffic.outcomes if o.error], [str(o) for o in traffic.outcomes
                                                          if o.error]
    assert {back["node"]["id"]} == spare
    base = [o for o in traffic.outcomes if variant_of[o.sender] == "base"]
    large = [o for o in traffic.outcomes if variant_of[o.sender] == "large"]
    assert {o.status for o in base} <= {200, 503}, [str(o) for o in base if o.status != 200]
    assert all(o.retry_after for o in base if o.status == 503)
    assert large and {o.status for o in large} == {200}, [str(o) for o in large if not o.ok]
    assert any(o.started > removed_at for o in base)  # the load ran through it
    assert 200 in [o.status for o in base if o.started > back_at], [str(o) for o in base]
