"""The batched engine's greedy output equals vanilla PEFT's, exactly, in float32 on CPU.

A tiny random Phi-3 carries three random LoRA adapters with non-zero B (different ranks, rsLoRA, partial
targets). PEFT's ``generate(adapter_names=[...])`` on one prompt at a time is the reference; the engine
must produce the same tokens for every adapter and the base, alone, in a mixed batch, and when requests
join a batch that is already decoding.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from persona_router.adapters.engine import BatchedEngine, EngineConfig
from persona_router.adapters.engine_api import GenerationRequest, TokenEvent
from persona_router.adapters.generation import SamplingConfig

QUESTIONS = ("why is the sky blue?", "the heart pumps blood. explain simply", "code")
ADAPTER_SPECS: dict[str, dict[str, Any]] = {
    "alpha": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "seed": 1},
    "beta": {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": "all-linear", "seed": 2},
    "gamma": {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj", "down_proj"], "seed": 3},
}
NEW_TOKENS = 16


def make_adapter(model_dir: Path, folder: Path, *, seed: int, b_std: float = 0.03, **lora: Any) -> Path:
    """A PEFT LoRA adapter with random, non-zero A and B, saved as a normal adapter folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=b_std)
    peft_model.save_pretrained(str(folder))
    return folder


def prompts(tokenizer: Any) -> list[tuple[int, ...]]:
    from persona_router.adapters.prompts import prompt_ids

    return [tuple(prompt_ids(tokenizer, [{"role": "user", "content": q}])) for q in QUESTIONS]


class PeftReference:
    """Vanilla PEFT greedy generation, one prompt at a time, memoised."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path]) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        names = list(adapters)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        self.model = model.eval()
        self._memo: dict[tuple[str | None, tuple[int, ...], int], list[int]] = {}

    def tokens(self, adapter: str | None, prompt: tuple[int, ...], max_new_tokens: int = NEW_TOKENS) -> list[int]:
        import torch

        key = (adapter, prompt, max_new_tokens)
        if key not in self._memo:
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=max_new_tokens, adapter_names=[adapter or "__base__"],
                                          pad_token_id=self.tokenizer.pad_token_id)
            self._memo[key] = out[0, len(prompt):].tolist()
        return self._memo[key]


@pytest.fixture(scope="session")
def engine_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-adapters")
    return {name: make_adapter(tiny_model_dir, root / name, **spec) for name, spec in ADAPTER_SPECS.items()}


@pytest.fixture(scope="session")
def peft_reference(tiny_model_dir: Path, engine_adapters: dict[str, Path]) -> PeftReference:
    return PeftReference(tiny_model_dir, engine_adapters)


def make_engine(model_dir: Path, adapters: dict[str, Path] | None = None, **config: Any) -> BatchedEngine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings: dict[str, Any] = {"max_batch": 8, "max_len": 256}
    settings.update(config)
    engine = BatchedEngine(AutoModelForCausalLM.from_pretrained(model_dir).eval(),
                           AutoTokenizer.from_pretrained(model_dir), EngineConfig(**settings))
    for name, folder in (adapters or {}).items():
        engine.add_adapter(name, folder)
    return engine


def request(rid: str, prompt: tuple[int, ...], adapter: str | None, max_new_tokens: int = NEW_TOKENS,
            **sampling: Any) -> GenerationRequest:
    return GenerationRequest(rid, prompt, adapter, SamplingConfig(max_new_tokens=max_new_tokens, **sampling))


async def collect(handle: Any) -> list[TokenEvent]:
    return [event async for event in handle]


def generated(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def run_with(engine: BatchedEngine, body: Callable[[BatchedEngine], Coroutine[Any, Any, Any]]) -> Any:
    """Start the engine on a fresh event loop, run ``body``, always stop the worker."""

    async def main() -> Any:
        engine.start(asyncio.get_running_loop())
        try:
            return await asyncio.wait_for(body(engine), timeout=60)
        finally:
            engine.stop()

    return asyncio.run(main())


def test_adapters_change_the_output(peft_reference: PeftReference) -> None:
    """Guard: the reference differs per adapter, so the equalities below prove the LoRA is applied."""
    prompt = prompts(peft_reference.tokenizer)[0]
    outputs = {name: tuple(peft_reference.tokens(name, prompt)) for name in (None, *ADAPTER_SPECS)}
    assert len(set(outputs.values())) == len(outputs)


def test_each_adapter_alone_matches_peft(tiny_model_dir: Path, engine_adapters: dict[str, Path],
                                         peft_reference: PeftReference) -> None:
    engine = make_engine(tiny_model_dir, engine_adapters)
    cases = [(adapter, prompt) for prompt in prompts(peft_reference.tokenizer) for adapter in (None, *ADAPTER_SPECS)]

    async def body(engine: BatchedEngine) -> list[list[int]]:
        # One at a time: each request has the engine to itself.
        return [generated(await collect(engine.submit(request(f"r{i}", prompt, adapter))))
                for i, (adapter, prompt) in enumerate(cases)]

    for (adapter, prompt), tokens in zip(cases, run_with(engine, body), strict=True):
        assert tokens == peft_reference.tokens(adapter, prompt), (adapter, prompt)


def test_mixed_batch_equals_each_alone(tiny_model_dir: Path, engine_adapters: dict[str, Path],
                                       peft_reference: PeftReference) -> None:
    engine = make_engine(tiny_model_dir, engine_adapters, max_batch=16)
    cases = [(adapter, prompt) for prompt in prompts(peft_reference.tokenizer) for adapter in (None, *ADAPTER_SPECS)]

    async def body(engine: BatchedEngine) -> list[list[int]]:
        handles = [engine.submit(request(f"r{i}", prompt, adapter)) for i, (adapter, prompt) in enumerate(cases)]
        return [generated(events) for events in await asyncio.gather(*(collect(h) for h in handles))]

    results = run_with(engine, body)
    assert engine.scheduler.steps < len(cases) * NEW_TOKENS / 4  # they really shared decode steps
    for (adapter, prompt), tokens in zip(cases, results, strict=True):
        assert tokens == peft_reference.tokens(adapter, prompt), (adapter, prompt)


def test_requests_join_mid_flight(tiny_model_dir: Path, engine_adapters: dict[str, Path],
                                  peft_reference: PeftReference) -> None:
    engine = make_engine(tiny_model_dir, engine_adapters)
    first, *others = prompts(peft_reference.tokenizer)
    late = [("beta", others[0]), (None, others[1]), ("gamma", others[1])]

    async def body(engine: BatchedEngine) -> tuple[list[int], list[list[int]], bool]:
        leader = engine.submit(request("lead", first, "alpha", max_new_tokens=40))
        events: list[TokenEvent] = []
        iterator = leader.__aiter__()
        while len(events) < 5:
            events.append(await iterator.__anext__())
        still_running = engine.stats().running == 1 and not leader.done
        handles = [engine.submit(request(f"late{i}", p, a)) for i, (a, p) in enumerate(late)]
        late_events = await asyncio.gather(*(collect(h) for h in handles))
        events.extend([e async for e in iterator])
        return generated(events), [generated(e) for e in late_events], still_running

    lead_tokens, late_tokens, still_running = run_with(engine, body)
    assert still_running
    assert lead_tokens == peft_reference.tokens("alpha", first, 40)
    for (adapter, prompt), tokens in zip(late, late_tokens, strict=True):
        assert tokens == peft_reference.tokens(adapter, prompt)


def test_llama_layout_matches_peft(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Llama's separate q/k/v and gate/up fuse into one product each; LoRA fuses block-diagonally."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    make_adapter(tmp_path / "llama", tmp_path / "adapter", seed=5, b_std=0.1, r=8, lora_alpha=16,
                 target_modules=["q_proj", "v_proj", "up_proj", "down_proj", "o_proj"])
    reference = PeftReference(tmp_path / "llama", {"x": tmp_path / "adapter"})
    engine = make_engine(tmp_path / "llama", {"x": tmp_path / "adapter"})
    cases = [(adapter, prompt) for prompt in prompts(tokenizer)[:2] for adapter in (None, "x")]

    async def body(engine: BatchedEngine) -> list[list[int]]:
        handles = [engine.submit(request(f"r{i}", prompt, adapter)) for i, (adapter, prompt) in enumerate(cases)]
        return [generated(events) for events in await asyncio.gather(*(collect(h) for h in handles))]

    for (adapter, prompt), tokens in zip(cases, run_with(engine, body), strict=True):
        assert tokens == reference.tokens(adapter, prompt)
    assert any(reference.tokens("x", p) != reference.tokens(None, p) for _, p in cases)


def test_fused_numerics_match_peft(tiny_model_dir: Path, engine_adapters: dict[str, Path],
                                   peft_reference: PeftReference) -> None:
    """The CUDA formulation (residual and LoRA folded into addmm, scaling into the mask) on CPU: same tokens."""
    engine = make_engine(tiny_model_dir, engine_adapters, max_batch=16, fuse="on")
    cases = [(adapter, prompt) for prompt in prompts(peft_reference.tokenizer) for adapter in (None, *ADAPTER_SPECS)]

    async def body(engine: BatchedEngine) -> list[list[int]]:
        handles = [engine.submit(request(f"r{i}", prompt, adapter)) for i, (adapter, prompt) in enumerate(cases)]
        return [generated(events) for events in await asyncio.gather(*(collect(h) for h in handles))]

    assert engine.runner.fused
    for (adapter, prompt), tokens in zip(cases, run_with(engine, body), strict=True):
        assert tokens == peft_reference.tokens(adapter, prompt), (adapter, prompt)
