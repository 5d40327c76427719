"""One in-process engine per device in one pool (``serve --devices``), tested with two CPU engines on the tiny
model: placement by adapter affinity, spill-over, adapter loads per device, a failing engine taken out of
rotation with no lost request, and outputs equal to vanilla PEFT's whichever engine answers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from persona_router.adapters.engine import BatchedEngine
from persona_router.adapters.engine_member import EngineMember
from persona_router.adapters.upstream_member import PoolConfig, rendezvous_order
from persona_router.adapters.upstream_pool import UpstreamPool
from persona_router.service.settings import ServiceSettings

from tests.unit.test_engine_equivalence import (
    PeftReference,
    collect,
    engine_adapters,
    generated,
    make_engine,
    peft_reference,
    prompts,
    request,
    run_with,
)

__all__ = ["engine_adapters", "peft_reference"]  # fixtures shared with the equivalence tests

DEVICES = ("cpu#0", "cpu#1")
Scenario = Callable[[UpstreamPool, dict[str, BatchedEngine]], Awaitable[Any]]


def run_pool(model_dir: Path, adapters: dict[str, Path], scenario: Scenario, *, max_in_flight: int = 4,
             health_interval_s: float = 0.1, **engine_config: Any) -> Any:
    engines = {name: make_engine(model_dir, stop_token_ids=(), **engine_config) for name in DEVICES}
    pool = UpstreamPool([EngineMember(name, engine, probe_timeout_s=10) for name, engine in engines.items()],
                        PoolConfig(max_in_flight=max_in_flight, health_interval_s=health_interval_s))

    async def main() -> Any:
        pool.start(asyncio.get_running_loop())
        try:
            assert await pool.wait_up(30) == 2
            for name, folder in adapters.items():
                await asyncio.to_thread(pool.add_adapter, name, folder)
            return await asyncio.wait_for(scenario(pool, engines), timeout=120)
        finally:
            await asyncio.to_thread(pool.stop)

    return asyncio.run(main())


def home(adapter: str) -> str:
    return rendezvous_order(adapter, list(DEVICES))[0]


def test_each_adapter_lives_on_its_home_device_and_answers_match_peft(
        tiny_model_dir: Path, engine_adapters: dict[str, Path], peft_reference: PeftReference) -> None:
    prompt = prompts(peft_reference.tokenizer)[0]

    async def scenario(pool: UpstreamPool, engines: dict[str, BatchedEngine]) -> None:
        for adapter in engine_adapters:
            assert [n for n, e in engines.items() if adapter in e.adapter_names()] == [home(adapter)]
        for adapter in [*engine_adapters, None]:
            before = {m["name"]: m["requests"] for m in pool.describe()}
            events = await collect(pool.submit(request(f"p-{adapter}", prompt, adapter)))
            assert generated(events) == peft_reference.tokens(adapter, prompt)
            if adapter is not None:  # it ran on its home device
                grew = [m["name"] for m in pool.describe() if m["requests"] > before[m["name"]]]
                assert grew == [home(adapter)]
        loads = {m["name"]: m["adapter_loads"] for m in pool.describe()}
        assert sum(loads.values()) == len(engine_adapters)  # one load per adapter, on its home only

    run_pool(tiny_model_dir, engine_adapters, scenario)


def test_a_saturated_device_spills_over_and_the_adapter_loads_there(
        tiny_model_dir: Path, engine_adapters: dict[str, Path], peft_reference: PeftReference) -> None:
    prompt = prompts(peft_reference.tokenizer)[1]
    adapter = "alpha"
    first, second = rendezvous_order(adapter, list(DEVICES))

    async def scenario(pool: UpstreamPool, engines: dict[str, BatchedEngine]) -> None:
        assert adapter not in engines[second].adapter_names()
        results = await asyncio.gather(*(collect(pool.submit(request(f"s{i}", prompt, adapter, max_new_tokens=24)))
                                         for i in range(4)))
        want = peft_reference.tokens(adapter, prompt, 24)
        assert all(generated(events) == want for events in results)
        assert adapter in engines[second].adapter_names()  # spilled over: loaded on demand
        described = {m["name"]: m for m in pool.describe()}
        assert described[first]["requests"] == 2 and described[second]["requests"] == 2
        assert described[second]["adapter_loads"] >= 1

    run_pool(tiny_model_dir, {adapter: engine_adapters[adapter]}, scenario, max_in_flight=2)


def test_a_failing_engine_leaves_rotation_and_no_request_is_lost(
        tiny_model_dir: Path, engine_adapters: dict[str, Path], peft_reference: PeftReference,
        monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = prompts(peft_reference.tokenizer)[2]

    async def scenario(pool: UpstreamPool, engines: dict[str, BatchedEngine]) -> None:
        broken = home("beta")
        healthy = next(n for n in DEVICES if n != broken)

        def fail(emitted: Any) -> None:
            raise RuntimeError("device lost")  # every step on this device fails from now on

        monkeypatch.setattr(engines[broken].scheduler, "step", fail)
        jobs = [(f"f{i}", name) for i, name in enumerate(["beta", "alpha", "gamma", None] * 3)]
        results = await asyncio.gather(*(collect(pool.submit(request(rid, prompt, adapter)))
                                         for rid, adapter in jobs))
        for (_, adapter), events in zip(jobs, results, strict=True):
            assert events[-1].finish_reason in ("stop", "length"), events[-1]
            assert generated(events) == peft_reference.tokens(adapter, prompt)
        described = {m["name"]: m for m in pool.describe()}
        assert not described[broken]["up"] and described[broken]["retries"] >= 1
        assert described[healthy]["up"]
        # Out of rotation: new requests go straight to the healthy device.
        events = await collect(pool.submit(request("after", prompt, "beta")))
        assert generated(events) == peft_reference.tokens("beta", prompt)
        assert {m["name"]: m for m in pool.describe()}[broken]["requests"] == described[broken]["requests"]

    run_pool(tiny_model_dir, engine_adapters, scenario, health_interval_s=3600)


def test_a_device_without_a_free_adapter_slot_passes_the_adapter_on(
        tiny_model_dir: Path, engine_adapters: dict[str, Path]) -> None:
    """A full adapter bank is busy, not down: the adapter goes to the next device of its ranking."""
    async def scenario(pool: UpstreamPool, engines: dict[str, BatchedEngine]) -> None:
        first, second = rendezvous_order("beta", list(DEVICES))
        await asyncio.to_thread(engines[first].add_adapter, "filler", engine_adapters["alpha"])  # its one slot
        await asyncio.to_thread(pool.add_adapter, "beta", engine_adapters["beta"])
        assert "beta" in engines[second].adapter_names() and "beta" not in engines[first].adapter_names()
        assert all(m["up"] for m in pool.describe())

    run_pool(tiny_model_dir, {}, scenario, max_adapters=1)


def test_removing_an_adapter_unloads_it_from_every_device(
        tiny_model_dir: Path, engine_adapters: dict[str, Path], peft_reference: PeftReference) -> None:
    prompt = prompts(peft_reference.tokenizer)[0]

    async def scenario(pool: UpstreamPool, engines: dict[str, BatchedEngine]) -> None:
        await asyncio.gather(*(collect(pool.submit(request(f"r{i}", prompt, "gamma"))) for i in range(4)))
        assert all("gamma" in e.adapter_names() for e in engines.values())  # home + spill-over
        await asyncio.to_thread(pool.remove_adapter, "gamma")
        assert not any("gamma" in e.adapter_names() for e in engines.values())

    run_pool(tiny_model_dir, {"gamma": engine_adapters["gamma"]}, scenario, max_in_flight=1)


def test_a_poisoned_adapter_is_reported_and_stays_out_of_service(
        tiny_model_dir: Path, engine_adapters: dict[str, Path], peft_reference: PeftReference) -> None:
    """The device's watchdog quarantines an adapter whose slot yields NaN: the pool passes the report on (the
    service's residency retires it) and its health checks must not load it back meanwhile."""
    from persona_router.core.errors import AdapterError

    prompt = prompts(peft_reference.tokenizer)[0]
    reports: list[str] = []

    async def scenario(pool: UpstreamPool, engines: dict[str, BatchedEngine]) -> None:
        pool.on_quarantine = lambda name, reason: reports.append(name)
        engine = engines[home("alpha")]
        index = engine.bank.slot_of("alpha") - 1
        for layer in engine.bank.a:
            for tensor in layer.values():
                tensor[index].fill_(float("nan"))
        events = await collect(pool.submit(request("poisoned", prompt, "alpha")))
        assert events[-1].finish_reason == "error" and "non-finite" in (events[-1].error or "")
        await asyncio.sleep(0.5)  # several health checks
        assert reports == ["alpha"] and set(engine.quarantined()) == {"alpha"}
        assert "alpha" not in engine.adapter_names()  # not re-synced back into service
        refused = await collect(pool.submit(request("again", prompt, "alpha")))
        assert isinstance(refused[-1].failure, AdapterError) and "quarantined" in str(refused[-1].failure)
        healthy = await collect(pool.submit(request("beta", prompt, "beta")))
        assert generated(healthy) == peft_reference.tokens("beta", prompt)

    run_pool(tiny_model_dir, engine_adapters, scenario, health_interval_s=0.05)


def test_a_busy_engine_passes_its_probe_while_it_keeps_stepping(
        tiny_model_dir: Path, peft_reference: PeftReference, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe queues behind running requests (one row here); an engine that keeps stepping is up, one that
    stops stepping is not, each found within the probe's time limit."""
    import time

    engine = make_engine(tiny_model_dir, stop_token_ids=(), max_batch=1)
    real_step = engine.scheduler.step

    def slow_step(emitted: Any) -> Any:
        time.sleep(0.02)
        return real_step(emitted)

    monkeypatch.setattr(engine.scheduler, "step", slow_step)
    member = EngineMember("cpu#0", engine, probe_timeout_s=0.5)
    prompt = prompts(peft_reference.tokenizer)[0]

    async def body(_: BatchedEngine) -> None:
        long = engine.submit(request("long", prompt, None, max_new_tokens=120))
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        assert await member.probe() == []  # busy: up, with its (no) adapters
        assert time.perf_counter() - started < 2.0

        def stuck(emitted: Any) -> Any:
            time.sleep(0.05)  # makes no progress
            return None

        monkeypatch.setattr(engine.scheduler, "step", stuck)
        await asyncio.sleep(0.2)  # a step already under way finishes first
        assert await member.probe() is None
        long.cancel()

    run_with(engine, body)


def test_devices_setting_is_validated() -> None:
    from persona_router.core.errors import ConfigError

    assert ServiceSettings(devices=("cuda:0", "cuda:1")).devices == ("cuda:0", "cuda:1")
    with pytest.raises(ConfigError, match="cuda:N"):
        ServiceSettings(devices=("gpu0",))
    with pytest.raises(ConfigError, match="--engine vllm"):
        ServiceSettings(devices=("cpu",), engine="vllm", upstreams=("http://a:1",))
