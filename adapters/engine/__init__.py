"""Fast multi-adapter generation: the service's ``Engine`` (``adapters.engine_api``).

Modules, bottom up: ``config`` (EngineConfig), ``weights`` (a loaded HF Phi-3/Llama model's weights in
fused groups, dense or NF4), ``peft_adapter`` (reading and checking PEFT LoRA folders), ``lora_bank``
(resident adapters stacked per layer and group; batched LoRA by selecting each row's slot), ``runner`` (the
forward pass over a static KV cache), ``graphs`` (CUDA graphs for decode), ``sampling``, ``detok``,
``scheduler`` (continuous batching, the non-finite watchdog) and ``engine`` (worker thread, asyncio streaming).
"""

from __future__ import annotations

from typing import Any

from persona_router.adapters.engine.config import EngineConfig
from persona_router.adapters.engine.engine import BatchedEngine, EngineHandle

__all__ = ["BatchedEngine", "EngineConfig", "EngineHandle", "build_engine"]


def build_engine(base: Any, config: EngineConfig | None = None) -> BatchedEngine:
    """An engine over a ``LoadedBase`` (``adapters.base_model.load_base``)."""
    return BatchedEngine(base.model, base.tokenizer, config)
