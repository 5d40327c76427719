"""Answer many evaluation prompts at once through the batched multi-adapter engine (``adapters.engine``).

Evaluation used to call Hugging Face ``generate`` once per (arm, item): one sequence per forward pass. The
engine decodes up to ``max_batch`` sequences of any mix of adapters in each forward pass, and on CPU in
float32 its greedy tokens equal PEFT's (tests/unit/test_engine_equivalence.py), so the answers are the same
and only the wall time changes. Each request's ``latency_s`` is its own submit-to-last-token time inside the
shared batch, so it measures queueing and batching, not single-request speed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_router.adapters.generation import Completion, SamplingConfig
from persona_router.adapters.peft_folder import adapter_rank
from persona_router.core.errors import AdapterError, ConfigError

log = logging.getLogger(__name__)

KV_ROUND = 64  # cache length granularity


@dataclass(frozen=True)
class PromptJob:
    """One prompt to answer: token ids, the adapter folder (None: the bare base) and the decoding settings."""

    prompt_ids: tuple[int, ...]
    adapter: Path | None
    sampling: SamplingConfig


@dataclass(frozen=True)
class TimedCompletion:
    completion: Completion
    latency_s: float


def generate_batched(base: Any, jobs: Sequence[PromptJob], *, max_batch: int = 32,
                     progress: Callable[[int], None] | None = None) -> list[TimedCompletion]:
    """Answer every job (in input order) with one engine; adapters are loaded once each."""
    if not jobs:
        return []
    if max_batch < 1:
        raise ConfigError(f"{max_batch} must be >= 1", field="batch_size")
    from persona_router.adapters.engine import EngineConfig, build_engine

    folders = list(dict.fromkeys(j.adapter for j in jobs if j.adapter is not None))
    longest = max(len(j.prompt_ids) + j.sampling.max_new_tokens for j in jobs)
    config = EngineConfig(max_batch=min(max_batch, len(jobs)), max_len=-(-(longest + 1) // KV_ROUND) * KV_ROUND,
                          max_queue=len(jobs) + 1, max_adapters=max(1, len(folders)),
                          max_rank=engine_max_rank(folders), kv_block=KV_ROUND)
    engine = build_engine(base, config)
    names = {folder: f"arm{k}" for k, folder in enumerate(folders)}
    for folder, name in names.items():
        engine.add_adapter(name, folder)
    return asyncio.run(_run_all(engine, base.tokenizer, jobs, names, progress))


async def _run_all(engine: Any, tokenizer: Any, jobs: Sequence[PromptJob], names: dict[Path, str],
                   progress: Callable[[int], None] | None) -> list[TimedCompletion]:
    from persona_router.adapters.engine_api import GenerationRequest

    engine.start(asyncio.get_running_loop())

    async def one(index: int, job: PromptJob) -> TimedCompletion:
        adapter = names[job.adapter] if job.adapter is not None else None
        started = time.perf_counter()
        handle = engine.submit(GenerationRequest(f"eval-{index}", job.prompt_ids, adapter, job.sampling))
        ids: list[int] = []
        async for event in handle:
            if event.finish_reason == "error":
                raise AdapterError(f"generation failed for evaluation prompt {index}: {event.error}")
            if event.token_id is not None:
                ids.append(event.token_id)
        if progress is not None:
            progress(1)
        # Decoded whole, exactly as adapters.generation.generate_one does (a streamed text would hold back a
        # trailing incomplete character).
        completion = Completion(text=tokenizer.decode(ids, skip_special_tokens=True).strip(),
                                prompt_tokens=len(job.prompt_ids), completion_tokens=len(ids))
        return TimedCompletion(completion, time.perf_counter() - started)

    try:
        return list(await asyncio.gather(*(one(k, job) for k, job in enumerate(jobs))))
    finally:
        engine.stop()


def engine_max_rank(folders: Sequence[Path]) -> int:
    """The engine's ``max_rank`` for these adapters: their largest LoRA rank (8 without adapters). The
    engine's default (16) would refuse a higher-rank adapter, and a larger one would pad every adapter."""
    return max([adapter_rank(f) for f in folders] or [8])
