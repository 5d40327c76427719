"""The engine against vanilla PEFT on CUDA (tiny random Phi-3 with random LoRA adapters).

Tolerances and why:
- float32: greedy tokens must be identical, CUDA graphs on. TF32 is off, so both sides compute in true
  float32 and differ only in summation order (about 1e-6 relative), far below the random model's top-2
  logit gaps on these prompts.
- bfloat16 and NF4 (bf16 compute): greedy decoding of two correct implementations may part at a near-tie,
  after which the sequences are unrelated, so tokens are not compared end to end. Instead the engine is
  teacher-forced along PEFT's greedy sequence and its logits at every position must satisfy
  ||engine - peft|| / ||peft|| <= 2e-2 (bf16 operands give 1e-3..1e-2 per product, a few layers compound
  it; PEFT also runs LoRA in float32 where the engine uses bf16), and the argmax must agree at every
  position where PEFT's top-2 margin exceeds 0.25 (logit units), i.e. wherever rounding cannot decide.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from persona_router.adapters.engine import BatchedEngine, EngineConfig
from persona_router.adapters.engine.lora_bank import slot_bucket

from tests.unit.test_engine_equivalence import (
    ADAPTER_SPECS,
    collect,
    engine_adapters,
    generated,
    prompts,
    request,
    run_with,
)

pytestmark = pytest.mark.gpu
__all__ = ["engine_adapters"]

REL_TOL = 2e-2
MARGIN = 0.25
NEW_TOKENS = 24


def _load(model_dir: Path, precision: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if precision == "nf4":
        from persona_router.adapters.base_model import nf4_config

        return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4_config(),
                                                    dtype=torch.bfloat16, device_map={"": 0}).eval()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to("cuda").eval()


def _peft(model_dir: Path, adapters: dict[str, Path], precision: str) -> Any:
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(_load(model_dir, precision), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def _engine(model_dir: Path, adapters: dict[str, Path], precision: str, **config: Any) -> BatchedEngine:
    from transformers import AutoTokenizer

    settings: dict[str, Any] = {"max_batch": 16, "max_len": 256, "cuda_graphs": "on"}
    settings.update(config)
    engine = BatchedEngine(_load(model_dir, precision), AutoTokenizer.from_pretrained(model_dir),
                           EngineConfig(**settings))
    for name, folder in adapters.items():
        engine.add_adapter(name, folder)
    return engine


def _greedy(peft_model: Any, prompt: tuple[int, ...], adapter: str | None, new_tokens: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=new_tokens, adapter_names=[adapter or "__base__"],
                                  pad_token_id=0)
    return [int(t) for t in out[0, len(prompt):].tolist()]


def _reference_logits(peft_model: Any, prompt: tuple[int, ...], continuation: list[int], adapter: str | None) -> Any:
    import torch

    ids = torch.tensor([list(prompt) + continuation], device="cuda")
    with torch.inference_mode():
        logits = peft_model(input_ids=ids, adapter_names=[adapter or "__base__"]).logits[0].float()
    return logits[len(prompt) - 1:len(prompt) - 1 + len(continuation)]


def _engine_logits(engine: BatchedEngine, prompt: tuple[int, ...], continuation: list[int], adapter: str | None) -> Any:
    """Teacher-forced: prefill the prompt, then feed the reference tokens one decode step at a time."""
    import torch

    slot = engine.bank.acquire(adapter)
    try:
        runner, m = engine.runner, slot_bucket(slot, engine.bank.capacity)
        rows = [runner.prefill([0], [list(prompt)], [slot], m)[0].clone()]
        for i, token in enumerate(continuation[:-1]):
            position = len(prompt) + i
            runner.step_inputs[0] = torch.tensor([token, position, slot], device="cuda")
            rows.append(engine.scheduler.decoder(1, runner.kv_len_for(position), m)[0].clone())
        return torch.stack(rows)
    finally:
        engine.bank.release(slot)


@pytest.fixture(scope="module")
def cuda_required() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False


def test_fp32_greedy_tokens_identical_mixed_batch(cuda_required: None, tiny_model_dir: Path,
                                                  engine_adapters: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    peft_model = _peft(tiny_model_dir, engine_adapters, "fp32")
    cases = [(a, p) for p in prompts(tokenizer) for a in (None, *ADAPTER_SPECS)]
    expected = [_greedy(peft_model, p, a, NEW_TOKENS) for a, p in cases]
    engine = _engine(tiny_model_dir, engine_adapters, "fp32")

    async def body(engine: BatchedEngine) -> tuple[list[list[int]], list[list[int]]]:
        alone = [generated(await collect(engine.submit(request(f"a{i}", p, a, NEW_TOKENS))))
                 for i, (a, p) in enumerate(cases)]
        handles = [engine.submit(request(f"m{i}", p, a, NEW_TOKENS)) for i, (a, p) in enumerate(cases)]
        mixed = [generated(e) for e in await asyncio.gather(*(collect(h) for h in handles))]
        return alone, mixed

    alone, mixed = run_with(engine, body)
    assert engine.graphs is not None and not engine.graphs.disabled and engine.graphs.captures > 0
    assert alone == expected
    assert mixed == expected


def test_fp32_adapter_swap_during_graph_replay(cuda_required: None, tiny_model_dir: Path,
                                               engine_adapters: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    first, second, _ = prompts(tokenizer)
    peft_model = _peft(tiny_model_dir, engine_adapters, "fp32")
    expected_old, expected_new = _greedy(peft_model, first, "alpha", 40), _greedy(peft_model, second, "beta", 16)
    engine = _engine(tiny_model_dir, {"live": engine_adapters["alpha"]}, "fp32", max_adapters=2)

    async def body(engine: BatchedEngine) -> tuple[list[int], list[int]]:
        old = engine.submit(request("old", first, "live", 40))
        iterator = old.__aiter__()
        events = [await iterator.__anext__() for _ in range(3)]
        await asyncio.to_thread(engine.add_adapter, "live", engine_adapters["beta"])
        new = engine.submit(request("new", second, "live", 16))
        events.extend([e async for e in iterator])
        return generated(events), generated(await collect(new))

    old_tokens, new_tokens = run_with(engine, body)
    assert old_tokens == expected_old
    assert new_tokens == expected_new


@pytest.mark.parametrize(("precision", "nf4_mode", "kernels", "gemv", "lora_rows"), [
    ("bf16", "auto", "on", "bitsandbytes", 8), ("bf16", "auto", "off", "bitsandbytes", 8),
    ("nf4", "fused", "on", "bitsandbytes", 8), ("nf4", "fused", "off", "bitsandbytes", 8),
    ("nf4", "dequantize", "on", "bitsandbytes", 8),
    ("nf4", "dequantize", "on", "triton", 8), ("nf4", "dequantize", "on", "kmajor", 8),
    ("nf4", "dequantize", "on", "cuda", 8), ("nf4", "fused", "on", "cuda", 8), ("bf16", "auto", "on", "dense", 8),
    ("nf4", "dequantize", "off", "bitsandbytes", 8),
    ("nf4", "kernel", "off", "bitsandbytes", 8),
    # every step's LoRA on the Triton kernels, the prefills' many rows too (the tensor-core shrink)
    ("nf4", "dequantize", "on", "kmajor", 4096), ("bf16", "auto", "on", "bitsandbytes", 4096)])
def test_low_precision_logits_within_tolerance(cuda_required: None, tiny_model_dir: Path,
                                               engine_adapters: dict[str, Path], precision: str,
                                               nf4_mode: str, kernels: str, gemv: str, lora_rows: int) -> None:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    peft_model = _peft(tiny_model_dir, engine_adapters, precision)
    # "dense": the CUDA C++ GEMV for the one-row products on dense weights (``dense_gemv``)
    engine = _engine(tiny_model_dir, engine_adapters, precision, nf4_mode=nf4_mode, kernels=kernels,
                     gemv="kmajor" if gemv == "dense" else gemv, dense_gemv="on" if gemv == "dense" else "off",
                     lora_kernel_rows=lora_rows)
    assert engine.runner.kernels == (kernels == "on")
    if gemv == "triton":  # every 4-bit group of the tiny model has a register-lookup view
        assert all(group.gemv is not None and group.gemv.lut is not None
                   for layer in engine.runner.w.layers for group in layer.groups.values())
    if nf4_mode == "fused":  # groups with K a multiple of 128 (down) share one K-major copy for every row count;
        # the tiny model's K=64 groups keep the row-major kernels
        groups = [group for layer in engine.runner.w.layers for group in layer.groups.values()]
        assert all((group.kmajor is not None) == (group.in_features % 128 == 0) for group in groups)
        assert any(group.kmajor is not None for group in groups)
    if gemv in ("kmajor", "cuda") and nf4_mode == "dequantize":  # every 4-bit group has a K-major copy
        assert all(group.gemv is not None and group.gemv.kmajor is not None
                   and group.gemv.kmajor.kernel == ("cuda" if gemv == "cuda" else "triton")
                   for layer in engine.runner.w.layers for group in layer.groups.values())
    if gemv == "dense":  # every dense group's one-row product is the CUDA GEMV
        assert all(engine.runner._dense_gemv(group, 1) for layer in engine.runner.w.layers
                   for group in layer.groups.values())
    if gemv == "cuda" and nf4_mode == "fused":  # the one-row kernel of the shared K-major copies
        assert all(group.kmajor.kernel == "cuda" for layer in engine.runner.w.layers
                   for group in layer.groups.values() if group.kmajor is not None)
    for prompt in prompts(tokenizer)[:2]:
        for adapter in (None, *ADAPTER_SPECS):
            continuation = _greedy(peft_model, prompt, adapter, NEW_TOKENS)
            ref = _reference_logits(peft_model, prompt, continuation, adapter)
            got = _engine_logits(engine, prompt, continuation, adapter)
            rel = float((got - ref).norm() / ref.norm())
            assert rel <= REL_TOL, (adapter, rel)
            top2 = ref.topk(2, dim=-1).values
            decisive = (top2[:, 0] - top2[:, 1]) > MARGIN
            assert torch.equal(got.argmax(-1)[decisive], ref.argmax(-1)[decisive]), adapter


def test_prefill_graph_replay_equals_eager(cuda_required: None, tiny_model_dir: Path,
                                           engine_adapters: dict[str, Path]) -> None:
    """The first prefill of a shape captures a graph, later ones replay it with new prompts, rows and slots:
    each must give the eager prefill's logits (float32, TF32 off)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = _engine(tiny_model_dir, engine_adapters, "fp32")
    graphs = engine.prefill_graphs
    assert graphs is not None
    cases = [([1], [list(p)], [engine.bank.acquire(a)]) for p in prompts(tokenizer) for a in ("alpha", None)]
    for rows, batch, slots in cases:
        m = slot_bucket(max(slots), engine.bank.capacity)
        got = graphs(rows, batch, slots, m).clone()
        want = engine.runner.prefill(rows, batch, slots, m)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), float((got - want).abs().max())
    assert graphs.captures >= 1 and not graphs.disabled
    assert graphs.captures < len(cases)  # later prompts of the same padded length replayed a captured graph
