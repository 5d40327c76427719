"""One poisoned adapter or cache row never reaches another request (CPU, tiny model, float32).

A diverged adapter (non-finite weights, or finite weights so large that its products overflow) next to
healthy ones in a mixed batch: the healthy requests still equal vanilla PEFT token for token, the poisoned
request fails with a clear error, its adapter is quarantined, and once it is unloaded the engine answers
exactly like a fresh one.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from persona_router.adapters.engine import BatchedEngine
from persona_router.adapters.engine.peft_adapter import WEIGHTS_FILE, load_adapter
from persona_router.adapters.engine_api import TokenEvent
from persona_router.core.errors import AdapterError

from tests.unit.test_engine_equivalence import (
    ADAPTER_SPECS,
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


def _rewrite_tensors(source: Path, target: Path, change: Any) -> Path:
    """Copy an adapter folder, passing every lora_A / lora_B tensor through ``change(key, tensor)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(str(source / WEIGHTS_FILE))
    save_file({key: change(key, t).contiguous() for key, t in tensors.items()}, str(target / WEIGHTS_FILE))
    return target


def _nan_copy(source: Path, target: Path) -> Path:
    def poison(key: str, tensor: Any) -> Any:
        if "layers.1." in key and "lora_B" in key:
            tensor = tensor.clone()
            tensor[0, 0] = float("nan")
        return tensor

    return _rewrite_tensors(source, target, poison)


def _overflowing_copy(source: Path, target: Path) -> Path:
    """Finite weights (so they pass the load check) whose products overflow float32 to inf at run time."""
    import torch

    return _rewrite_tensors(source, target, lambda key, t: torch.full_like(t, 3e38) if "lora_A" in key else t)


def _shapes(engine: BatchedEngine) -> dict[str, Any]:
    return {"groups": engine.group_shapes, "num_layers": engine.num_layers, "max_rank": engine.config.max_rank}


def test_non_finite_adapter_is_refused_at_load(tiny_model_dir: Path, engine_adapters: dict[str, Path],
                                               tmp_path: Path) -> None:
    engine = make_engine(tiny_model_dir)
    folder = _nan_copy(engine_adapters["alpha"], tmp_path / "nan")
    with pytest.raises(AdapterError, match=r"layers\.1\..*lora_B.*non-finite"):
        load_adapter(folder, **_shapes(engine))
    with pytest.raises(AdapterError, match="non-finite"):
        engine.add_adapter("nan", folder)
    assert engine.adapter_names() == []
    # The bank refuses them too, whoever builds the weights.
    from persona_router.adapters.engine.lora_bank import check_finite

    weights = load_adapter(engine_adapters["alpha"], **_shapes(engine))
    pair = weights.tensors[(0, "qkv")]
    pair[0][0, 0] = float("inf")
    with pytest.raises(AdapterError, match="layer 0 qkv lora_A holds non-finite"):
        check_finite(weights)
    with pytest.raises(AdapterError, match="non-finite"):
        engine.bank.install("inf", weights)
    assert engine.bank.in_use() == 0


def _poison_in_bank(engine: BatchedEngine, folder: Path) -> None:
    """A slot whose memory holds NaN (as if written by a bad kernel or a bypassed check)."""
    engine.add_adapter("poison", folder)
    index = engine.bank.slot_of("poison") - 1
    for layer in engine.bank.a:
        for tensor in layer.values():
            tensor[index].fill_(float("nan"))


def _poison_from_file(engine: BatchedEngine, folder: Path) -> None:
    engine.add_adapter("poison", _overflowing_copy(folder, folder.parent / "overflowing"))


@pytest.mark.parametrize("poison", [_poison_in_bank, _poison_from_file], ids=["nan-in-bank", "overflow"])
def test_poisoned_adapter_in_mixed_batch(tiny_model_dir: Path, engine_adapters: dict[str, Path],
                                         peft_reference: PeftReference, tmp_path: Path, poison: Any) -> None:
    # Fewer rows than requests: the second wave reuses the cache rows the poisoned requests left behind.
    engine = make_engine(tiny_model_dir, engine_adapters, max_batch=8)
    shutil.copytree(engine_adapters["alpha"], tmp_path / "alpha-copy")
    poison(engine, tmp_path / "alpha-copy")
    quarantined: list[tuple[str, str]] = []
    engine.on_quarantine = lambda name, reason: quarantined.append((name, reason))
    healthy = [(adapter, prompt) for prompt in prompts(peft_reference.tokenizer) for adapter in (None, *ADAPTER_SPECS)]
    cases = [*healthy[:4], ("poison", healthy[0][1]), *healthy[4:8], ("poison", healthy[9][1]), *healthy[8:]]

    async def body(engine: BatchedEngine) -> list[list[TokenEvent]]:
        handles = [engine.submit(request(f"r{i}", prompt, adapter)) for i, (adapter, prompt) in enumerate(cases)]
        return list(await asyncio.gather(*(collect(h) for h in handles)))

    results = run_with(engine, body)
    for (adapter, prompt), events in zip(cases, results, strict=True):
        if adapter != "poison":
            assert generated(events) == peft_reference.tokens(adapter, prompt), (adapter, prompt)
    for (adapter, _), events in zip(cases, results, strict=True):
        if adapter == "poison":
            assert events[-1].finish_reason == "error"
            assert "non-finite" in (events[-1].error or "") and "'poison' is quarantined" in (events[-1].error or "")
    with pytest.raises(AdapterError, match=r"'poison' is quarantined .*non-finite"):
        engine.submit(request("again", healthy[0][1], "poison"))
    assert [name for name, _ in quarantined] == ["poison"]
    assert set(engine.quarantined()) == {"poison"}
    assert engine.adapter_names() == sorted(ADAPTER_SPECS)

    # Unloaded: the engine answers exactly like a fresh one (the same tokens as PEFT), in one mixed batch.
    engine.remove_adapter("poison")
    assert engine.quarantined() == {}
    assert engine.bank.in_use() == len(ADAPTER_SPECS)

    async def again(engine: BatchedEngine) -> list[list[int]]:
        handles = [engine.submit(request(f"s{i}", prompt, adapter)) for i, (adapter, prompt) in enumerate(healthy)]
        return [generated(events) for events in await asyncio.gather(*(collect(h) for h in handles))]

    for (adapter, prompt), tokens in zip(healthy, run_with(engine, again), strict=True):
        assert tokens == peft_reference.tokens(adapter, prompt), (adapter, prompt)


def test_stale_cache_row_is_reset_on_admission(tiny_model_dir: Path, engine_adapters: dict[str, Path],
                                               peft_reference: PeftReference) -> None:
    """What a finished request leaves in its cache row (here: NaN everywhere) never reaches the next one."""
    engine = make_engine(tiny_model_dir, engine_adapters, max_batch=2)
    for cache in (*engine.runner.k_cache, *engine.runner.v_cache):
        cache.fill_(float("nan"))
    cases = [("alpha", p) for p in prompts(peft_reference.tokenizer)[:2]]

    async def body(engine: BatchedEngine) -> list[list[int]]:
        handles = [engine.submit(request(f"r{i}", prompt, adapter)) for i, (adapter, prompt) in enumerate(cases)]
        return [generated(events) for events in await asyncio.gather(*(collect(h) for h in handles))]

    for (adapter, prompt), tokens in zip(cases, run_with(engine, body), strict=True):
        assert tokens == peft_reference.tokens(adapter, prompt)
    assert engine.quarantined() == {}


def test_quarantined_adapter_can_be_added_again(tiny_model_dir: Path, engine_adapters: dict[str, Path],
                                                peft_reference: PeftReference, tmp_path: Path) -> None:
    """An admin fixing the files and loading the adapter again clears the quarantine."""
    engine = make_engine(tiny_model_dir, engine_adapters, max_batch=4)
    shutil.copytree(engine_adapters["alpha"], tmp_path / "alpha-copy")
    _poison_from_file(engine, tmp_path / "alpha-copy")
    prompt = prompts(peft_reference.tokenizer)[0]

    async def body(engine: BatchedEngine) -> list[TokenEvent]:
        return await collect(engine.submit(request("bad", prompt, "poison")))

    assert run_with(engine, body)[-1].finish_reason == "error"
    assert "poison" in engine.quarantined()
    engine.add_adapter("poison", engine_adapters["alpha"])
    assert engine.quarantined() == {}

    async def good(engine: BatchedEngine) -> list[int]:
        return generated(await collect(engine.submit(request("good", prompt, "poison"))))

    assert run_with(engine, good) == peft_reference.tokens("alpha", prompt)



def test_a_refused_submit_holds_no_slot_and_no_queue_place(tiny_model_dir: Path, engine_adapters: dict[str, Path],
                                                            peft_reference: PeftReference) -> None:
    """A request that ``submit`` refuses (bad stop strings) gives back nothing it never had: its adapter's
    slot reference and its queue place would otherwise stay taken for good."""
    from dataclasses import replace

    from persona_router.core.errors import PersonaRouterError

    engine = make_engine(tiny_model_dir, engine_adapters, max_batch=2)
    engine.config = replace(engine.config, max_queue=2)
    prompt = prompts(peft_reference.tokenizer)[0]
    bad = replace(request("bad", prompt, "alpha"), stop=("",) * 5)

    async def body(engine: BatchedEngine) -> list[list[int]]:
        for _ in range(5):
            with pytest.raises(PersonaRouterError):
                engine.submit(bad)
        assert engine.stats().queued == 0
        handles = [engine.submit(request(f"ok{i}", prompt, "alpha")) for i in range(2)]  # the whole queue
        return [generated(events) for events in await asyncio.gather(*(collect(h) for h in handles))]

    assert run_with(engine, body) == [peft_reference.tokens("alpha", prompt)] * 2
    engine.remove_adapter("alpha")
    assert engine.bank.in_use() == len(engine_adapters) - 1  # alpha's slot was freed: no reference leaked
