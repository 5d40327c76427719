"""Plain single-request generation with Hugging Face ``generate``: the CLI's path and the reference that
the batched engine is checked against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from persona_router.adapters.prompts import prompt_ids
from persona_router.core.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings; ``temperature == 0`` means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 4096:
            raise ConfigError(f"{self.max_new_tokens} must be between 1 and 4096", field="max_new_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"{self.temperature} must be between 0 and 2", field="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{self.top_p} must be in (0, 1]", field="top_p")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.greedy:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens}


def decode_answer(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """An answer's text from its token ids: the one decode the service's answers and a pool's continuation
    share (their streamed text must join exactly)."""
    return str(tokenizer.decode(list(token_ids), skip_special_tokens=True))


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> frozenset[int]:
    """What ``generate`` stops on: the generation config's end-of-sequence ids plus the tokenizer's.

    The one definition of the default stop ids; both engines apply it to every request.
    """
    ids: set[int] = set()
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(t) for t in configured)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int


def generate_one(model: Any, tokenizer: Any, messages: list[dict[str, str]], sampling: SamplingConfig,
                 *, adapter_name: str | None = None) -> Completion:
    """Answer one chat prompt; with ``adapter_name`` only that PEFT adapter is applied (no global switch)."""
    import torch

    ids = prompt_ids(tokenizer, messages)
    input_ids = torch.tensor([ids], device=model.device)
    kwargs = sampling.generate_kwargs()
    if adapter_name is not None:
        kwargs["adapter_names"] = [adapter_name]
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
    new_tokens = output[0, len(ids):].tolist()
    text = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    return Completion(text=text, prompt_tokens=len(ids), completion_tokens=len(new_tokens))
