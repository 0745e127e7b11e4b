"""The model lifecycle on its own (serve_app/inference/lifecycle.py): no Ray, no torch, a fake
engine whose loads can be held or made to fail, and a clock the test moves."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from serve_app.config import ModelSettings
from serve_app.errors import ModelLoadError
from serve_app.inference.lifecycle import ModelLifecycle, State

IDLE_S = 60.0


@dataclass
class FakeInfo:
    source: str
    weights: str = "random"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    load_s: float = 0.0
    backend: str = "torch"
    backend_info: dict | None = None


class FakeEngine:
    def __init__(self, settings: ModelSettings, compiles: bool = True):
        self.settings = settings
        # As the real engine does: the backend asked for, or eager torch and the reason why.
        runs = settings.backend if compiles else "torch"
        note = None if compiles else f"{settings.backend} cannot run here"
        self.info = FakeInfo(settings.source, backend=runs,
                             backend_info={"requested": settings.backend, "note": note})
        self.unloaded = False

    def identity(self) -> dict:
        return {"source": self.settings.source, "precision": self.settings.precision}

    def unload(self) -> None:
        self.unloaded = True


class Factory:
    """build(settings) for the lifecycle. A source in `failing` fails to load; a source with a
    gate waits (in the load's worker thread) until the test opens it."""

    def __init__(self) -> None:
        self.started: list[str] = []  # every load begun, in order
        self.built: list[FakeEngine] = []
        self.failing: set[str] = set()
        self.uncompilable: set[str] = set()  # sources whose compiled backend cannot run
        self.gates: dict[str, threading.Event] = {}

    def hold(self, source: str) -> threading.Event:
        self.gates[source] = threading.Event()
        return self.gates[source]

    def __call__(self, settings: ModelSettings) -> FakeEngine:
        self.started.append(settings.source)
        gate = self.gates.get(settings.source)
        if gate is not None and not gate.wait(10):
            raise TimeoutError(f"the test never opened the gate of {settings.source}")
        if settings.source in self.failing:
            raise ModelLoadError(f"cannot load {settings.source}")
        engine = FakeEngine(settings, compiles=settings.source not in self.uncompilable)
        self.built.append(engine)
        return engine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Metrics:
    def __init__(self) -> None:
        self.loads: list[tuple[str, bool]] = []
        self.loaded: list[bool] = []
        self.queue: list[int] = []
        self.backends: list[tuple[str, str]] = []

    def load(self, kind: str, ok: bool) -> None:
        self.loads.append((kind, ok))

    def set_loaded(self, loaded: bool) -> None:
        self.loaded.append(loaded)

    def set_queue(self, length: int) -> None:
        self.queue.append(length)

    def set_backend(self, backend: str, requested: str) -> None:
        self.backends.append((backend, requested))


def model(source: str, **fields) -> ModelSettings:
    return ModelSettings(source=f"/models/{source}", **fields)


@dataclass
class Rig:
    lifecycle: ModelLifecycle
    factory: Factory
    clock: Clock
    metrics: Metrics
    freed: list[int]


def rig() -> Rig:
    factory, clock, metrics, freed = Factory(), Clock(), Metrics(), []
    lifecycle = ModelLifecycle("base", factory, metrics=metrics, clock=clock,
                               free_memory=lambda: freed.append(1))
    return Rig(lifecycle, factory, clock, metrics, freed)


def run(scenario) -> None:
    """Run `scenario(rig)` on a fresh event loop, and stop the lifecycle's tasks after it."""
    async def main() -> None:
        r = rig()
        try:
            await asyncio.wait_for(scenario(r), timeout=20)
        finally:
            await r.lifecycle.close()

    asyncio.run(main())


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.005)


async def started(factory: Factory, count: int) -> None:
    await until(lambda: len(factory.started) >= count)


def source_of(lifecycle: ModelLifecycle) -> str | None:
    return lifecycle.engine.settings.source if lifecycle.engine else None


# -- the first config -------------------------------------------------------------------------
def test_first_config_is_loaded_before_configure_returns():
    async def scenario(r: Rig) -> None:
        assert r.lifecycle.state == State.WAITING_FOR_CONFIG
        assert "set this deployment user_config" in r.lifecycle.health_problem()
        await r.lifecycle.configure(model("a"))
        info = r.lifecycle.info()
        assert (info["state"], info["load_count"], info["source"]) == ("ready", 1, "/models/a")
        assert info["identity"] == {"source": "/models/a", "precision": "fp32"}
        assert r.lifecycle.health_problem() is None
        assert r.metrics.loads == [("initial", True)] and r.metrics.loaded == [True]
        await r.lifecycle.configure(model("a"))  # the same config again: no second load
        assert r.factory.started == ["/models/a"]

    run(scenario)


def test_initial_load_failure_raises_and_is_reported():
    async def scenario(r: Rig) -> None:
        r.factory.failing.add("/models/a")
        with pytest.raises(ModelLoadError, match="cannot load /models/a"):
            await r.lifecycle.configure(model("a"))
        assert r.lifecycle.state == State.FAILED
        assert r.lifecycle.info()["error"] == "cannot load /models/a"
        assert "failed: cannot load" in r.lifecycle.health_problem()
        assert r.metrics.loads == [("initial", False)]
        with pytest.raises(RuntimeError, match="no model configured"):
            async with r.lifecycle.use():
                pass

    run(scenario)


def test_a_config_during_the_initial_load_is_loaded_after_it():
    async def scenario(r: Rig) -> None:
        gate = r.factory.hold("/models/a")
        first = asyncio.create_task(r.lifecycle.configure(model("a")))
        await started(r.factory, 1)
        assert r.lifecycle.state == State.LOADING
        await r.lifecycle.configure(model("b"))
        gate.set()
        await first
        await until(lambda: source_of(r.lifecycle) == "/models/b")
        assert r.lifecycle.load_count == 2 and r.lifecycle.state == State.READY

    run(scenario)


# -- swaps ------------------------------------------------------------------------------------
def test_swap_loads_beside_the_old_engine_then_switches():
    async def scenario(r: Rig) -> None:
        await r.lifecycle.configure(model("a"))
        old = r.lifecycle.engine
        gate = r.factory.hold("/models/b")
        await r.lifecycle.configure(model("b"))  # returns at once: the load runs behind
        await started(r.factory, 2)
        assert r.lifecycle.state == State.SWAPPING
        async with r.lifecycle.use() as engine:  # served by the old engine meanwhile...
            assert engine is old
            gate.set()
            await until(lambda: r.lifecycle.state == State.READY)
            assert engine is old and not old.unloaded  # ...to the end of the request
        async with r.lifecycle.use() as engine:
            assert engine.settings.source == "/models/b"
        swap = r.lifecycle.last_swap
        assert swap["result"] == "ok" and swap["error"] is None
        assert swap["from"]["source"] == "/models/a" and swap["to"]["source"] == "/models/b"
        assert r.lifecycle.load_count == 2
        assert r.metrics.loads == [("initial", True), ("swap", True)]

    run(scenario)


def test_failed_swap_keeps_the_old_engine_and_says_so():
    async def scenario(r: Rig) -> None:
        await r.lifecycle.configure(model("a"))
        old = r.lifecycle.engine
        r.factory.failing.add("/models/broken")
        await r.lifecycle.configure(model("broken", precision="reduced"))
        await until(lambda: r.lifecycle.last_swap is not None)
        assert r.lifecycle.engine is old and r.lifecycle.state == State.READY
        swap = r.lifecycle.last_swap
        assert swap["result"] == "failed" and "cannot load /models/broken" in swap["error"]
        assert swap["requested"] == {"source": "/models/broken", "precision": "reduced"}
        assert swap["serving"]["source"] == "/models/a"
        assert r.lifecycle.health_problem() is None and r.lifecycle.load_count == 1
        assert r.metrics.loads[-1] == ("swap", False)

    run(scenario)


def test_concurrent_swaps_the_latest_config_wins():
    async def scenario(r: Rig) -> None:
        await r.lifecycle.configure(model("a"))
        gate = r.factory.hold("/models/b")
        await r.lifecycle.configure(model("b"))
        await started(r.factory, 2)
        await r.lifecycle.configure(model("c"))  # waits behind b, superseded before it starts
        await r.lifecycle.configure(model("d"))
        gate.set()
        await until(lambda: source_of(r.lifecycle) == "/models/d")
        await until(lambda: not r.lifecycle._background)
        assert r.factory.started == ["/models/a", "/models/b", "/models/d"]  # c never loaded
        assert r.lifecycle.load_count == 2  # b was loaded, then dropped: never served
        assert r.lifecycle.last_swap["from"]["source"] == "/models/a"
        assert r.lifecycle.last_swap["to"]["source"] == "/models/d"

    run(scenario)


def test_same_load_key_applies_live_and_drops_a_swap_in_progress():
    async def scenario(r: Rig) -> None:
        await r.lifecycle.configure(model("a"))
        old = r.lifecycle.engine
        await r.lifecycle.configure(model("a", max_audio_s=30, max_batch_size=4))
        assert r.lifecycle.engine is old and old.settings.max_audio_s == 30
        assert r.lifecycle.info()["max_batch_size"] == 4
        gate = r.factory.hold("/models/b")
        await r.lifecycle.configure(model("b"))
        await started(r.factory, 2)
        await r.lifecycle.configure(model("a", max_audio_s=20))  # back to a: b is dropped
        assert old.settings.max_audio_s == 20
        gate.set()
        await until(lambda: not r.lifecycle._background)
        assert r.lifecycle.engine is old and r.lifecycle.state == State.READY
        assert r.lifecycle.load_count == 1 and r.factory.started[-1] == "/models/b"

    run(scenario)


# -- requests, idle release and reload --------------------------------------------------------
def test_idle_release_then_the_next_request_reloads():
    async def scenario(r: Rig) -> None:
        await r.lifecycle.configure(model("a", idle_unload_s=IDLE_S))
        old = r.lifecycle.engine
        r.clock.now += IDLE_S - 1
        assert not await r.lifecycle.release_if_idle()
        r.clock.now += 2
        assert await r.lifecycle.release_if_idle()
        info = r.lifecycle.info()
        assert (info["state"], info["identity"], info["source"]) == ("unloaded", None, None)
        assert old.unloaded and r.freed == [1] and r.metrics.loaded == [True, False]
        assert r.lifecycle.health_problem() is None  # released is healthy: it loads on demand
        async with r.lifecycle.use() as engine:
            assert engine is not old and engine.settings.source == "/models/a"
        assert (r.lifecycle.state, r.lifecycle.load_count) == (State.READY, 2)
        assert r.metrics.loads == [("initial", True), ("reload", True)]

    run(scenario)


def test_idle_time_counts_from_the_load_not_from_the_start():
    async def scenario(r: Rig) -> None:
        r.clock.now += IDLE_S * 3  # the replica took long to get its config (or to load)
        await r.lifecycle.configure(model("a", idle_unload_s=IDLE_S))
        assert not await r.lifecycle.release_if_idle()
        r.clock.now += IDLE_S
        assert await r.lifecycle.release_if_idle()

    run(scenario)


def test_requests_in_flight_are_counted_and_block_release():
    async def scenario(r: Rig) -> None:
        await r.lifecycle.configure(model("a", idle_unload_s=IDLE_S))
        async with r.lifecycle.use() as engine:
            assert r.lifecycle.info()["in_flight"] == 1
            r.clock.now += IDLE_S * 2  # idle by the clock, but a request holds the engine
            assert not await r.lifecycle.release_if_idle()
            assert not await r.lifecycle.release()  # an explicit release is refused too
            assert r.lifecycle.engine is engine and not engine.unloaded
        assert r.lifecycle.info()["in_flight"] == 0 and r.metrics.queue == [1, 0]
        # The request's end counts as a use: idle is measured from it.
        assert not await r.lifecycle.release_if_idle()
        r.clock.now += IDLE_S
        assert await r.lifecycle.release_if_idle()

    run(scenario)


def test_requests_waiting_for_a_reload_share_one_load():
    async def scenario(r: Rig) -> None:
        await r.lifecycle.configure(model("a"))
        assert await r.lifecycle.release()
        gate = r.factory.hold("/models/a")

        async def request() -> FakeEngine:
            async with r.lifecycle.use() as engine:
                return engine

        waiting = [asyncio.create_task(request()) for _ in range(3)]
        await started(r.factory, 2)
        assert r.lifecycle.state == State.LOADING and r.lifecycle.in_flight == 3
        gate.set()
        engines = await asyncio.gather(*waiting)
        assert len({id(engine) for engine in engines}) == 1
        assert r.factory.started == ["/models/a", "/models/a"]

    run(scenario)


def test_reload_failure_fails_the_request_and_the_next_one_tries_again():
    async def scenario(r: Rig) -> None:
        await r.lifecycle.configure(model("a"))
        assert await r.lifecycle.release()
        r.factory.failing.add("/models/a")
        with pytest.raises(ModelLoadError):
            async with r.lifecycle.use():
                pass
        assert r.lifecycle.state == State.FAILED and r.lifecycle.in_flight == 0
        assert "cannot load /models/a" in r.lifecycle.health_problem()
        assert r.metrics.loads[-1] == ("reload", False)
        r.factory.failing.clear()
        async with r.lifecycle.use() as engine:
            assert engine.settings.source == "/models/a"
        assert r.lifecycle.state == State.READY and r.lifecycle.health_problem() is None

    run(scenario)


def test_a_new_config_while_released_is_what_the_next_request_loads():
    async def scenario(r: Rig) -> None:
        await r.lifecycle.configure(model("a"))
        assert await r.lifecycle.release()
        await r.lifecycle.configure(model("b"))  # nothing loaded now: nothing to swap
        assert r.lifecycle.engine is None and r.factory.started == ["/models/a"]
        async with r.lifecycle.use() as engine:
            assert engine.settings.source == "/models/b"

    run(scenario)


# -- backends ---------------------------------------------------------------------------------
def test_a_backend_that_cannot_run_is_a_ready_engine_on_torch_not_a_failure(caplog):
    async def scenario(r: Rig) -> None:
        r.factory.uncompilable.add("/models/a")
        await r.lifecycle.configure(model("a", backend="openvino"))
        info = r.lifecycle.info()
        assert info["state"] == "ready" and r.lifecycle.health_problem() is None
        assert info["backend"] == "torch"
        assert info["backend_info"] == {"requested": "openvino",
                                        "note": "openvino cannot run here"}
        assert r.metrics.backends == [("torch", "openvino")]
        assert r.metrics.loads == [("initial", True)]
        assert "backend openvino asked for, torch runs" in caplog.text

    run(scenario)


def test_changing_the_backend_swaps_in_a_new_engine():
    async def scenario(r: Rig) -> None:
        await r.lifecycle.configure(model("a"))
        first = r.lifecycle.engine
        await r.lifecycle.configure(model("a", backend="openvino"))
        await until(lambda: r.lifecycle.engine is not first)
        assert r.lifecycle.info()["backend"] == "openvino"
        assert r.lifecycle.last_swap["result"] == "ok"
        assert r.metrics.backends == [("torch", "torch"), ("openvino", "openvino")]
        assert r.factory.started == ["/models/a", "/models/a"]

    run(scenario)
