"""Answer evaluation items through the batched engine (``adapters/engine``) instead of one ``generate`` call
per answer: every (arm, item) request is queued at once and the engine serves up to ``max_batch`` of them per
forward pass, rows of different adapters together.

On CPU in float32 the engine's greedy tokens equal PEFT's token for token (``tests/unit/test_engine_*``), so
the answers are those of ``ArmRunner``; only ``latency_s`` differs: here it is the time from queueing to the
last token, shared with the other requests of the batch, so it compares nothing between arms.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from persona_router.adapters.base_model import LoadedBase
from persona_router.adapters.generation import SamplingConfig
from persona_router.adapters.prompts import build_messages, prompt_ids
from persona_router.core.errors import AdapterError, ConfigError
from persona_router.core.pack import PersonaPack
from persona_router.eval.arms import DEFAULT_MAX_CONTEXT_CHARS, ArmAnswer, EvalItem, ResolvedArm, item_seed
from persona_router.eval.batch_generation import engine_max_rank

log = logging.getLogger(__name__)


@dataclass
class EngineArmRunner:
    """``ArmRunner.run`` through the batched engine: same prompts, seeds and decoding settings."""

    base: LoadedBase
    pack: PersonaPack
    sampling: SamplingConfig
    max_context_chars: int = DEFAULT_MAX_CONTEXT_CHARS
    max_batch: int = 16

    def __post_init__(self) -> None:
        if self.max_context_chars < 0:
            raise ConfigError(f"{self.max_context_chars} must be >= 0", field="max_context_chars")
        if self.max_batch < 1:
            raise ConfigError(f"{self.max_batch} must be >= 1", field="max_batch")

    def prompt(self, arm: ResolvedArm, item: EvalItem) -> list[int]:
        context = item.context[: self.max_context_chars] if item.context and self.max_context_chars else None
        messages = build_messages(item.question, system_prompt=arm.system_prompt(self.pack, item.persona),
                                  context=context)
        return prompt_ids(self.base.tokenizer, messages)

    def run(self, arms: Sequence[ResolvedArm], items: Sequence[EvalItem], *, seed: int,
            progress: Callable[[int], None] | None = None) -> dict[str, list[ArmAnswer]]:
        """Every arm answers every item; returns answers per arm label, in item order."""
        try:
            from persona_router.adapters.engine import EngineConfig, build_engine
        except ImportError as exc:
            raise ConfigError(f"the batched engine is unavailable ({exc}); use --engine sequential",
                              field="engine") from exc
        labels = [a.label for a in arms]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"arm labels must differ, got {labels}", field="arms")
        jobs = [(arm, item, self.prompt(arm, item)) for index, item in enumerate(items)
                for arm in (arms if index % 2 == 0 else list(reversed(arms)))]
        longest = max(len(ids) for _, _, ids in jobs) + self.sampling.max_new_tokens
        folders = list(dict.fromkeys(a.adapter_path for a in arms if a.adapter_path is not None))
        config = EngineConfig(max_batch=self.max_batch, max_len=_round_up(longest + 1, 64), max_queue=len(jobs) + 1,
                              max_adapters=max(1, len(folders)), max_rank=engine_max_rank(folders))
        engine = build_engine(self.base, config)
        names: dict[str, str] = {}
        for number, arm in enumerate(arms):
            if arm.adapter_path is not None and str(arm.adapter_path) not in names:
                name = f"arm{number}"
                try:
                    engine.add_adapter(name, arm.adapter_path)
                except (OSError, ValueError, KeyError, RuntimeError) as exc:
                    raise AdapterError(f"the engine cannot load this adapter: {exc}", path=arm.adapter_path) from exc
                names[str(arm.adapter_path)] = name
        answers = asyncio.run(self._generate(engine, jobs, names, seed=seed, progress=progress))
        out: dict[str, list[ArmAnswer]] = {a.label: [] for a in arms}
        by_key = {(a.arm, a.item_id): a for a in answers}
        for item in items:
            for arm in arms:
                out[arm.label].append(by_key[(arm.label, item.id)])
        return out

    async def _generate(self, engine: Any, jobs: Sequence[tuple[ResolvedArm, EvalItem, list[int]]],
                        names: dict[str, str], *, seed: int,
                        progress: Callable[[int], None] | None) -> list[ArmAnswer]:
        from persona_router.adapters.engine_api import GenerationRequest

        engine.start(asyncio.get_running_loop())
        try:
            async def one(number: int, arm: ResolvedArm, item: EvalItem, ids: list[int]) -> ArmAnswer:
                per_item = item_seed(seed, item.id)
                sampling = SamplingConfig(max_new_tokens=self.sampling.max_new_tokens,
                                          temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                                          seed=per_item)
                adapter = names.get(str(arm.adapter_path)) if arm.adapter_path is not None else None
                request = GenerationRequest(request_id=f"eval-{number}", prompt_ids=tuple(ids), adapter=adapter,
                                            sampling=sampling)
                start = time.perf_counter()
                tokens: list[int] = []
                async for event in engine.submit(request):
                    if event.token_id is not None:
                        tokens.append(event.token_id)
                    if event.finish_reason == "error":
                        raise RuntimeError(f"the engine failed on {item.id} ({arm.label}): {event.error}")
                if progress is not None:
                    progress(1)
                text = self.base.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                return ArmAnswer(item_id=item.id, arm=arm.label, text=text, latency_s=time.perf_counter() - start,
                                 prompt_tokens=len(ids), completion_tokens=len(tokens), seed=per_item)

            return list(await asyncio.gather(*(one(n, arm, item, ids) for n, (arm, item, ids) in enumerate(jobs))))
        finally:
            await asyncio.to_thread(engine.stop)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
