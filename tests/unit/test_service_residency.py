"""``adapters/residency.py`` against a fake engine: live versions, the LRU bound with pinning, in-flight
safety, refusals that other adapters survive, and admin enable/disable."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
from persona_router.adapters.engine_api import EngineStats
from persona_router.adapters.manifest import AdapterManifest, DatasetInfo, TrainMetrics, write_manifest
from persona_router.adapters.registry import AdapterRegistry
from persona_router.adapters.residency import AdapterNotFoundError, AdapterResidency
from persona_router.core.errors import AdapterError, AdapterIncompatibleError, QueueFullError, UnknownPersonaError

BASE = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64
PERSONAS = ("student", "clinician", "educator")


class FakeEngine:
    def __init__(self) -> None:
        self.loaded: dict[str, Path] = {}
        self.calls: list[tuple[str, str]] = []

    def add_adapter(self, name: str, folder: Path) -> None:
        self.calls.append(("add", name))
        self.loaded[name] = folder

    def remove_adapter(self, name: str) -> None:
        self.calls.append(("remove", name))
        del self.loaded[name]

    def adapter_names(self) -> list[str]:
        return sorted(self.loaded)

    def stats(self) -> EngineStats:
        return EngineStats(resident_adapters=self.adapter_names())


def publish(registry: AdapterRegistry, persona: str, *, fingerprint: str = BASE, corrupt: bool = False) -> int:
    from safetensors.numpy import save_file

    staged = registry.staging_dir(persona)
    (staged / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}), encoding="utf-8")
    if corrupt:
        (staged / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    else:
        save_file({"x.lora_A.weight": np.zeros((2, 2), dtype=np.float32)}, str(staged / "adapter_model.safetensors"))
    write_manifest(staged, AdapterManifest(
        persona=persona, version=1, base_model="test", base_fingerprint=fingerprint,
        dataset=DatasetInfo(source="t", sha256="0", rows_train=1, rows_eval=1, eval_source="t"),
        hyperparameters={}, device="cpu", precision="fp32", library_versions={},
        metrics=TrainMetrics(None, None, None, 0, 0.0, 0, 0.0, 0.0, 0.0, "process_max_rss")))
    return registry.publish(persona, staged)


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "adapters")


def make(registry: AdapterRegistry, max_resident: int = 8) -> tuple[AdapterResidency, FakeEngine]:
    engine = FakeEngine()
    residency = AdapterResidency(engine, registry, base_fingerprint=BASE, personas=PERSONAS,  # type: ignore[arg-type]
                                 max_resident=max_resident)
    return residency, engine


def test_reload_loads_live_versions_and_prompt_only_elsewhere(registry: AdapterRegistry) -> None:
    publish(registry, "student")
    publish(registry, "student")
    residency, engine = make(registry)
    report = asyncio.run(residency.reload())
    assert report["live"] == {"student": 2, "clinician": None, "educator": None}
    assert engine.adapter_names() == ["student@2"]
    assert residency.describe_persona("clinician")["status"] == "prompt-only"
    assert [v["state"] for v in residency.describe_persona("student")["versions"]] == ["available", "resident"]


def test_refused_versions_fall_back_and_others_keep_serving(registry: AdapterRegistry) -> None:
    publish(registry, "student")
    publish(registry, "student", corrupt=True)
    publish(registry, "clinician", fingerprint=OTHER)
    publish(registry, "educator")
    residency, engine = make(registry)

    async def scenario() -> None:
        report = await residency.reload()
        assert report["live"] == {"student": 1, "clinician": None, "educator": 1}
        kinds = {(r["persona"], r["version"]): r["kind"] for r in report["refused"]}
        assert kinds == {("student", 2): "broken", ("clinician", 1): "incompatible"}
        calls = len(engine.calls)
        await residency.reload()  # unchanged files: refusals are remembered, not retried
        assert len(engine.calls) == calls
        with pytest.raises(AdapterIncompatibleError, match="fingerprint"):
            await residency.acquire("clinician", 1)
        lease = await residency.acquire("student")
        assert lease is not None and lease.version == 1
        residency.release(lease)
        assert await residency.acquire("clinician") is None

    asyncio.run(scenario())


def test_lru_bound_evicts_non_live_first_and_never_in_flight(registry: AdapterRegistry) -> None:
    for persona in PERSONAS:
        publish(registry, persona)
    publish(registry, "student")  # student@1 old, student@2 live
    residency, engine = make(registry, max_resident=2)

    async def scenario() -> None:
        await residency.reload()
        assert len(engine.loaded) == 2  # a reload never evicts a live version for another
        old = await residency.acquire("student", 1)  # the old version, held by a request
        assert old is not None
        live = await residency.acquire("educator")
        assert live is not None
        assert "student@1" in engine.loaded and "educator@1" in engine.loaded  # the in-flight one stayed
        residency.release(live)
        residency.release(old)
        lease = await residency.acquire("clinician")
        assert lease is not None
        assert "student@1" not in engine.loaded  # not live: evicted before the live educator
        assert len(engine.loaded) <= 2
        busy = [await residency.acquire(p) for p in ("clinician", "educator")]
        with pytest.raises(QueueFullError):
            await residency.acquire("student")  # both slots serve requests
        for held in (lease, *busy):
            assert held is not None
            residency.release(held)

    asyncio.run(scenario())


def test_hot_swap_keeps_the_old_version_until_its_request_ends(registry: AdapterRegistry) -> None:
    publish(registry, "student")
    residency, engine = make(registry)

    async def scenario() -> None:
        await residency.reload()
        held = await residency.acquire("student")
        assert held is not None and held.version == 1
        publish(registry, "student")
        await residency.reload()
        assert residency.live("student") == 2 and "student@1" in engine.loaded
        await residency.unload("student", 1)  # disabled while in flight: removal waits
        assert "student@1" in engine.loaded
        residency.release(held)
        await asyncio.sleep(0.05)
        assert "student@1" not in engine.loaded and "student@2" in engine.loaded

    asyncio.run(scenario())


def test_admin_disable_enable_and_bad_targets(registry: AdapterRegistry) -> None:
    publish(registry, "student")
    publish(registry, "student")
    residency, engine = make(registry)

    async def scenario() -> None:
        await residency.reload()
        state = await residency.unload("student", 2)
        assert state["live_version"] == 1 and "student@2" not in engine.loaded
        with pytest.raises(AdapterError, match="disabled"):
            await residency.acquire("student", 2)
        state = await residency.load("student", 2)
        assert state["live_version"] == 2 and "student@2" in engine.loaded
        with pytest.raises(AdapterNotFoundError):
            await residency.load("student", 7)
        with pytest.raises(UnknownPersonaError):
            await residency.load("pirate", 1)

    asyncio.run(scenario())


def test_folder_stamp_changes_when_a_version_is_published(registry: AdapterRegistry) -> None:
    residency, _ = make(registry)
    empty = residency.folder_stamp()
    publish(registry, "educator")
    assert residency.folder_stamp() != empty


def test_a_publish_landing_during_a_reload_is_picked_up_by_the_watcher(registry: AdapterRegistry) -> None:
    """Fault injection: the version and its LATEST pointer appear after the reload scanned the folder but
    before it finished. The watcher must still notice (the stamp is taken before the scan, not after)."""
    from persona_router.adapters.residency_types import engine_name

    residency, engine = make(registry)
    real_scan = residency._scan
    landed: list[int] = []

    def scan_then_publish() -> dict[str, tuple[list[int], int | None, set[int], str | None]]:
        found = real_scan()
        if not landed:
            landed.append(publish(registry, "educator"))
        return found

    residency._scan = scan_then_publish  # type: ignore[method-assign]

    async def scenario() -> None:
        await residency.reload()
        assert residency.live("educator") is None  # that reload scanned before the publish
        watcher = asyncio.create_task(residency.watch(0.01))
        try:
            for _ in range(300):
                if residency.live("educator") == landed[0]:
                    break
                await asyncio.sleep(0.01)
        finally:
            watcher.cancel()
        assert residency.live("educator") == landed[0]
        assert engine_name("educator", landed[0]) in engine.adapter_names()

    asyncio.run(scenario())


def test_a_version_retiring_while_in_flight_takes_no_new_named_requests(registry: AdapterRegistry) -> None:
    """Disabled, deleted or quarantined while a request holds it, a version stays resident for that request
    only: asking for it by number must fail as it would were it not resident, or it never goes idle."""
    import shutil

    publish(registry, "student")
    publish(registry, "student")
    publish(registry, "educator")
    publish(registry, "educator")
    publish(registry, "clinician")
    publish(registry, "clinician")
    residency, engine = make(registry)

    async def scenario() -> None:
        await residency.reload()
        held = [await residency.acquire(persona, 1) for persona in ("student", "educator", "clinician")]
        await residency.unload("student", 1)
        shutil.rmtree(registry.path("educator", 1))
        await residency.reload()
        residency.quarantine("clinician@1", "non-finite logits")  # its removal waits for the lock
        assert {"student@1", "educator@1", "clinician@1"} <= set(engine.loaded)  # each request still runs
        with pytest.raises(AdapterError, match="disabled"):
            await residency.acquire("student", 1)
        with pytest.raises(AdapterNotFoundError):
            await residency.acquire("educator", 1)
        with pytest.raises(AdapterError, match="quarantined"):
            await residency.acquire("clinician", 1)
        for lease in held:
            assert lease is not None
            residency.release(lease)
        await asyncio.sleep(0.05)
        assert not {"student@1", "educator@1", "clinician@1"} & set(engine.loaded)  # idle, so gone
        assert all(residency.live(p) == 2 for p in ("student", "educator", "clinician"))

    asyncio.run(scenario())


def test_a_version_enabled_again_before_it_went_idle_stays_resident(registry: AdapterRegistry) -> None:
    publish(registry, "student")
    publish(registry, "student")
    residency, engine = make(registry)

    async def scenario() -> None:
        await residency.reload()
        held = await residency.acquire("student", 2)
        await residency.unload("student", 2)
        await residency.load("student", 2)
        assert held is not None
        residency.release(held)
        await asyncio.sleep(0.05)
        assert "student@2" in engine.loaded and ("remove", "student@2") not in engine.calls
        assert residency.live("student") == 2

    asyncio.run(scenario())


def test_files_fixed_while_a_check_fails_are_retried(registry: AdapterRegistry) -> None:
    """Fault injection: the adapter's files are replaced after the check read the broken ones but before
    the refusal was recorded. The refusal must carry the broken files' stamp, so the fixed ones load."""
    import shutil

    version = publish(registry, "student", corrupt=True)
    good = registry.path("student", version).parent / ".good"
    fixed = publish(registry, "clinician")
    residency, engine = make(registry)
    real_validate = residency._validate

    def validate_then_fix(persona: str, number: int) -> None:
        try:
            real_validate(persona, number)
        finally:
            if persona == "student" and not good.exists():
                shutil.copytree(registry.path("clinician", fixed), good)
                target = registry.path("student", number) / "adapter_model.safetensors"
                time.sleep(0.01)  # a later mtime even on coarse clocks
                shutil.copyfile(good / "adapter_model.safetensors", target)

    residency._validate = validate_then_fix  # type: ignore[method-assign]

    async def scenario() -> None:
        await residency.reload()
        assert residency.live("student") is None  # that check read the broken file
        lease = await residency.acquire("student", version)  # the fixed files are tried again
        assert lease is not None and "student@1" in engine.loaded
        residency.release(lease)

    asyncio.run(scenario())


def test_servers_sharing_a_folder_keep_each_others_disabled_versions(registry: AdapterRegistry) -> None:
    for _ in range(3):
        publish(registry, "student")
    first, _ = make(registry)
    second, _ = make(registry)

    async def scenario() -> None:
        await first.reload()
        await second.reload()
        await first.unload("student", 3)
        await first.reload()
        await second.unload("student", 2)  # second has not re-read the folder since first's change
        assert registry.disabled("student") == {2, 3}  # not overwritten with second's {2}
        assert second.live("student") == 1  # and second adopted first's record as it wrote its own
        assert first.folder_stamp() != first._folder_stamp  # first's watcher sees second's change
        await first.reload()
        assert first.live("student") == 1
        await first.load("student", 3)
        assert registry.disabled("student") == {2} and first.live("student") == 3

    asyncio.run(scenario())


def test_a_full_engine_bank_is_a_retry_not_a_refusal(registry: AdapterRegistry) -> None:
    """No free engine slot (retired slots still serving) says 'retry', and leaves the version usable."""
    publish(registry, "student")
    residency, engine = make(registry)
    full = [True]
    add = engine.add_adapter

    def add_or_busy(name: str, folder: Path) -> None:
        if full[0]:
            raise QueueFullError("all 2 adapter slots are in use")
        add(name, folder)

    engine.add_adapter = add_or_busy  # type: ignore[method-assign]

    async def scenario() -> None:
        await residency.reload()  # no slot: it loads on first use
        assert residency.live("student") == 1
        with pytest.raises(QueueFullError):
            await residency.acquire("student")
        assert residency.live("student") == 1  # not refused: still the live version
        full[0] = False
        lease = await residency.acquire("student")
        assert lease is not None and lease.version == 1 and "student@1" in engine.loaded

    asyncio.run(scenario())


def test_a_version_back_before_its_last_request_ended_stays_resident(registry: AdapterRegistry) -> None:
    """Disabled by another server (DISABLED.json) while a request runs, re-enabled before it ends: the reload
    makes it live again, and the last release must not unload it."""
    publish(registry, "student")
    residency, engine = make(registry)

    async def scenario() -> None:
        await residency.reload()
        held = await residency.acquire("student")
        assert held is not None
        registry.change_disabled("student", disable=(1,))
        await residency.reload()  # retired while in flight: waits for its request
        assert residency.live("student") is None
        registry.change_disabled("student", enable=(1,))
        await residency.reload()
        assert residency.live("student") == 1
        residency.release(held)
        await asyncio.sleep(0.05)
        assert "student@1" in engine.loaded and ("remove", "student@1") not in engine.calls

    asyncio.run(scenario())
