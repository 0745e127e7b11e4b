"""The compiled CPU backends (openvino, onnxruntime) against FunASR and eager torch, on the tiny
model only (a compile of base or large takes minutes: benchmarks/cpu.py measures those), and the
backend registry.

In-process engines share one artefact cache; the deployed variant at the end reuses it."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from serve_app.checkpoints import generate
from serve_app.config import BackendName, ModelSettings
from serve_app.inference import backends, onnx_graph
from serve_app.inference.backends import common
from serve_app.inference.engine import EmotionEngine
from serve_app.inference.graph import PaddedEncoder
from tests import clips as clip_maker
from tests.waiting import eventually, scrape

pytest.importorskip("openvino")
COMPILED = ("openvino", "onnxruntime")


def _clips() -> list[np.ndarray]:
    """Tones and noise of lengths that are not multiples of anything, all within window_s."""
    rng = np.random.default_rng(3)
    return [clip_maker.tone(1.0, 16_000, 180.0, 1), clip_maker.tone(2.3, 16_000, 260.0, 2),
            (rng.standard_normal(29_999) * 0.1).astype(np.float32),
            clip_maker.tone(0.04, 16_000, 300.0, 3)]  # 640 samples: a few frames only


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("backend-ckpt") / "tiny-seed3"
    generate.write_checkpoint(path, "tiny", 3)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("compiled")


@pytest.fixture(scope="module")
def engines(tiny, cache):
    """(backend, precision) -> a loaded, warmed engine on 1 thread."""
    made = {}
    for backend in ("torch", *COMPILED):
        for precision in ("fp32", "reduced"):
            engine = EmotionEngine(ModelSettings(source=str(tiny), backend=backend,
                                                 precision=precision, window_s=3.0,
                                                 compiled_cache_dir=str(cache)), "cpu", 1)
            engine.load()
            engine.warmup()
            made[backend, precision] = engine
    return made


def test_graph_equals_funasr_per_clip_and_in_a_padded_batch(engines):
    """PaddedEncoder (what openvino compiles), run eagerly, gives each clip of a padded batch
    FunASR's own frames for that clip alone."""
    model = engines["torch", "fp32"].model
    encoder = PaddedEncoder(model).eval()
    sources = [F.layer_norm(torch.from_numpy(c), c.shape) for c in _clips()]
    lengths = torch.tensor([len(s) for s in sources])
    waveform = torch.zeros(len(sources), int(lengths.max()) + 777)  # more padding than needed
    for i, source in enumerate(sources):
        waveform[i, :len(source)] = source
    with torch.no_grad():
        frames = encoder(waveform, lengths)
        counts = encoder.frame_lengths(lengths).tolist()
        for i, source in enumerate(sources):
            alone = model.extract_features(source.view(1, -1), padding_mask=None)["x"][0]
            assert counts[i] == alone.shape[0]
            torch.testing.assert_close(frames[i, :counts[i]], alone, atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_fp32_equals_funasr_generate(engines, tiny, funasr_models, backend):
    engine = engines[backend, "fp32"]
    assert engine.info.backend == backend and engine.info.dtype == "float32"
    auto = funasr_models(tiny)
    for clip in _clips():  # within window_s: FunASR runs the whole clip as we do
        expected = auto.generate(clip, granularity="utterance", extract_embedding=True)[0]
        got = engine.predict(clip, "utterance", extract_embedding=True)
        np.testing.assert_allclose(got.scores, expected["scores"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.embedding, expected["feats"], atol=1e-4, rtol=0)
        frame = auto.generate(clip, granularity="frame", extract_embedding=True)[0]
        got = engine.predict(clip, "frame", extract_embedding=True)
        assert got.embedding.shape == frame["feats"].shape
        np.testing.assert_allclose(got.embedding, frame["feats"], atol=1e-4, rtol=0)


@pytest.mark.parametrize(("backend", "precision"), [("openvino", "fp32"), ("openvino", "reduced"),
                                                  ("onnxruntime", "fp32")])
def test_compiled_serves_every_path_as_eager_does(engines, backend, precision):
    """Windows (a clip longer than window_s), frame embeddings, the timeline and padded
    batches: the same answers as eager torch at the same precision."""
    eager, compiled = engines["torch", precision], engines[backend, precision]
    tolerance = 1e-5 if precision == "fp32" else 5e-3
    long_clip = np.concatenate([clip_maker.tone(3.0, 16_000, 200.0, 4),
                                clip_maker.tone(1.5, 16_000, 320.0, 5)])  # two windows
    for clip in [*_clips(), long_clip]:
        a = eager.predict(clip, "frame", extract_embedding=True)
        b = compiled.predict(clip, "frame", extract_embedding=True)
        np.testing.assert_allclose(b.scores, a.scores, atol=tolerance, rtol=0)
        assert b.embedding.shape == a.embedding.shape
        assert [w["start_s"] for w in b.timeline] == [w["start_s"] for w in a.timeline]
        for x, y in zip(b.timeline, a.timeline):
            np.testing.assert_allclose(x["scores"], y["scores"], atol=tolerance, rtol=0)
    batch = _clips()
    together = compiled.predict_batch(batch, "frame", extract_embedding=True)
    for clip, joint in zip(batch, together):
        alone = compiled.predict(clip, "frame", extract_embedding=True)
        np.testing.assert_allclose(joint.scores, alone.scores, atol=tolerance, rtol=0)
        assert joint.embedding.shape == alone.embedding.shape


def test_reduced_precision_is_bf16_close_to_fp32_and_sums_to_one(engines):
    turbo, fp32 = engines["openvino", "reduced"], engines["openvino", "fp32"]
    if not backends.has_bf16():
        # A CPU without bf16 units: f32, and /v1/models says why.
        assert turbo.info.dtype == "float32"
        assert "no bf16 units" in turbo.info.backend_info["note"]
        pytest.skip("this CPU has no bf16 units: reduced precision runs in f32")
    assert turbo.info.dtype == "bfloat16"
    assert turbo.info.backend_info["precision"] == "bf16"
    for clip in _clips():
        a = fp32.predict(clip, "utterance", extract_embedding=True)
        b = turbo.predict(clip, "utterance", extract_embedding=True)
        assert sum(b.scores) == pytest.approx(1.0, abs=1e-5)
        assert np.abs(np.subtract(a.scores, b.scores)).max() < 5e-3
        cosine = np.dot(a.embedding, b.embedding) / (np.linalg.norm(a.embedding)
                                                     * np.linalg.norm(b.embedding))
        assert cosine > 0.999
        assert not np.allclose(a.scores, b.scores, atol=1e-7, rtol=0)  # really reduced


def test_onnxruntime_reduced_runs_f32_and_says_so(engines):
    turbo, fp32 = engines["onnxruntime", "reduced"], engines["onnxruntime", "fp32"]
    assert turbo.info.backend == "onnxruntime" and turbo.info.dtype == "float32"
    assert "reduced precision is not applied" in turbo.info.backend_info["note"]
    assert turbo.info.backend_info["cache_dir"] == fp32.info.backend_info["cache_dir"]
    clip = _clips()[1]
    np.testing.assert_allclose(turbo.predict(clip, "utterance", False).scores,
                               fp32.predict(clip, "utterance", False).scores, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("backend", "artefact", "library"),
                         [("openvino", "encoder.xml", "openvino"),
                          ("onnxruntime", "encoder.onnx", "onnxruntime")])
def test_artefacts_are_cached_per_checkpoint_and_reused(engines, tiny, cache, tmp_path, backend,
                                                         artefact, library):
    first = engines[backend, "fp32"].info.backend_info
    folder = first["cache_dir"]
    assert (Path(folder) / artefact).is_file()
    key = json.loads((Path(folder) / "key.json").read_text())
    assert key["checkpoint_sha256"] == engines[backend, "fp32"].info.sha256
    assert {library, "torch", "code", "backend"} <= set(key) and "cpu" not in key
    assert key["backend"] == backend
    again = EmotionEngine(ModelSettings(source=str(tiny), backend=backend,
                                        compiled_cache_dir=str(cache)), "cpu", 1)
    again.load()
    assert again.info.backend_info["cache"] == "hit"
    assert again.info.backend_info["cache_dir"] == folder
    other = tmp_path / "tiny-seed4"
    generate.write_checkpoint(other, "tiny", 4)
    different = EmotionEngine(ModelSettings(source=str(other), backend=backend,
                                            compiled_cache_dir=str(cache)), "cpu", 1)
    different.load()
    assert different.info.backend_info["cache"] == "miss"
    assert different.info.backend_info["cache_dir"] != folder


def test_the_cache_key_follows_the_code_that_builds_the_artefact(tmp_path):
    """A change to the exporter's source (a comment will do) is a new key, so a new folder."""
    changed = tmp_path / "onnx_graph.py"
    changed.write_text(Path(onnx_graph.__file__).read_text() + "# changed\n")
    before = common.cache_key("abc", "onnxruntime", {}, [onnx_graph])
    after = common.cache_key("abc", "onnxruntime", {}, [SimpleNamespace(__file__=str(changed))])
    assert before["code"] != after["code"]
    assert common.key_dir(tmp_path, before) != common.key_dir(tmp_path, after)
    assert common.cache_key("abc", "onnxruntime", {}, [onnx_graph]) == before  # stable


@pytest.mark.parametrize("backend", COMPILED)
def test_a_backend_that_cannot_run_leaves_eager_torch_with_the_reason(tiny, tmp_path, engines,
                                                                      backend):
    """Its cache cannot be written (a file where the folder should be): a real failure of the
    conversion, and the engine still loads, on eager torch, saying why."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    engine = EmotionEngine(ModelSettings(source=str(tiny), backend=backend,
                                         compiled_cache_dir=str(blocked / "compiled")), "cpu", 1)
    engine.load()
    engine.warmup()
    info = engine.info.backend_info
    assert engine.info.backend == "torch" and info["requested"] == backend
    assert f"{backend} unavailable, running eager torch" in info["note"]
    assert engine.identity()["backend"] == "torch"
    clip = _clips()[0]
    np.testing.assert_allclose(engine.predict(clip, "utterance", False).scores,
                               engines["torch", "fp32"].predict(clip, "utterance", False).scores,
                               atol=1e-6, rtol=0)


def test_backend_is_a_setting_that_needs_a_reload():
    torch_settings = ModelSettings(source="/m")
    assert torch_settings.backend == "torch"
    for backend in COMPILED:
        assert ModelSettings(source="/m", backend=backend).load_key() \
            != torch_settings.load_key()
    with pytest.raises(ValueError):
        ModelSettings(source="/m", backend="tensorrt")


def test_the_registry_names_exactly_the_settings_backends():
    """Each name the setting allows has a module with the interface; an unknown name is
    refused by the registry as by the config."""
    assert set(backends.REGISTRY) == set(typing.get_args(BackendName))
    for name in backends.REGISTRY:
        module = backends.backend_module(name)
        steps = ("convert", "load") if module.COMPILED else ("build",)
        assert isinstance(module.COMPILED, bool) and all(callable(getattr(module, step))
                                                         for step in steps)
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        backends.backend_module("tensorrt")
    with pytest.raises(ValueError, match="onnxruntime"):  # the error lists the valid ones
        ModelSettings(source="/m", backend="tensorrt")


def _backend_samples(cluster, variant: str, backend: str) -> dict:
    """The ray_emotion2vec_backend samples of this variant and the backend it runs (waited for:
    the gauge reaches the endpoint seconds after the replica sets it)."""
    return eventually(lambda: scrape(cluster.metrics_url, timeout_s=30).require(
        "ray_emotion2vec_backend", application="compiled", variant=variant, backend=backend),
        f"the backend gauge of {variant}", 60, interval_s=2)


def test_the_service_reports_the_backend_that_runs(cluster, tiny, cache, engines):
    """Two variants on openvino, deployed: one reuses the artefacts the engines above built
    (same checkpoint and cache); the other cannot write its cache and runs on eager torch,
    a running replica that says so. /v1/models and the metric say which backend runs."""
    blocked = cache.parent / "blocked-cache"
    blocked.write_text("")
    app = {"name": "compiled", "route_prefix": "/compiled",
           "import_path": "serve_app.app:build_app",
           "args": {"router_num_cpus": 0.05, "variants": {"fast": {"num_cpus": 0.05},
                                                          "fallback": {"num_cpus": 0.05}}},
           "deployments": [
               {"name": "Router", "user_config": {"default_version": "fast"}},
               {"name": "fast", "user_config": {
                   "source": str(tiny), "backend": "openvino", "precision": "reduced",
                   "threads": 1, "compiled_cache_dir": str(cache)}},
               {"name": "fallback", "user_config": {
                   "source": str(tiny), "backend": "openvino", "threads": 1,
                   "compiled_cache_dir": str(blocked / "compiled")}}]}
    cluster.put(app)
    try:
        status = cluster.wait_for("compiled", ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY"))
        assert status.status == "RUNNING", status
        url = cluster.url + "/compiled"
        variants = httpx.get(f"{url}/v1/models", timeout=30).json()["variants"]
        info = variants["fast"]
        assert info["backend"] == "openvino"
        assert info["dtype"] == ("bfloat16" if backends.has_bf16() else "float32")
        assert info["backend_info"]["requested"] == "openvino"
        assert info["backend_info"]["cache"] == "hit"
        fallback = variants["fallback"]
        assert fallback["state"] == "ready" and fallback["backend"] == "torch"
        assert fallback["backend_info"]["requested"] == "openvino"
        assert "running eager torch" in fallback["backend_info"]["note"]
        clip = _clips()[1]
        wav = clip_maker.write(cache.parent / "backend-clip.wav", clip, 16_000).read_bytes()
        body = httpx.post(f"{url}/v1/predict", files={"file": ("c.wav", wav)},
                          timeout=60).json()
        expected = engines["openvino", "reduced"].predict(clip, "utterance", False).scores
        np.testing.assert_allclose(list(body["scores"].values()), expected, atol=1e-3, rtol=0)
        body = httpx.post(f"{url}/v1/predict", files={"file": ("c.wav", wav)},
                          data={"model_version": "fallback"},
                          timeout=60).json()
        expected = engines["torch", "fp32"].predict(clip, "utterance", False).scores
        np.testing.assert_allclose(list(body["scores"].values()), expected, atol=1e-5, rtol=0)
        for variant, runs in (("fast", "openvino"), ("fallback", "torch")):
            samples = _backend_samples(cluster, variant, runs)
            assert {(dict(labels)["requested"], value) for labels, value in samples.items()} \
                == {("openvino", 1.0)}, samples
    finally:
        cluster.remove("compiled")
