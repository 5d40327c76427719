"""Next-token choice for a batch: greedy rows by one argmax, sampled rows by temperature and top-p.

Each sampled request owns a CPU ``torch.Generator`` (seeded from its ``seed`` when given) that draws one
uniform number per token; the draw picks a token by inverse CDF on the device. So a seeded request gets
the same tokens whatever else shares its batch and whichever device runs it, and no generator state is
shared between requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from persona_router.adapters.generation import SamplingConfig


@dataclass
class RowSampler:
    """Sampling state of one request."""

    config: SamplingConfig
    generator: Any = None  # torch.Generator on CPU, for sampled requests only

    @classmethod
    def create(cls, config: SamplingConfig, fallback_seed: int) -> RowSampler:
        if config.greedy:
            return cls(config)
        import torch

        generator = torch.Generator()
        generator.manual_seed(config.seed if config.seed is not None else fallback_seed)
        return cls(config, generator)

    def uniform(self) -> float:
        import torch

        return float(torch.rand(1, generator=self.generator).item())


def choose_tokens(logits: Any, samplers: list[RowSampler | None], greedy: list[int] | None = None) -> list[int]:
    """Tokens for the rows of ``logits`` ([n, vocab], float32); rows with ``None`` are padding (ignored).

    ``greedy``: each row's argmax, already on the host (the decode step computes it on the device, beside its
    logits): then greedy rows cost no device work and no transfer here."""
    import torch

    sampled = [(i, s) for i, s in enumerate(samplers) if s is not None and not s.config.greedy]
    if greedy is not None and not sampled:
        return list(greedy)
    tokens = torch.argmax(logits, dim=-1)
    if sampled:
        chosen = [s for _, s in sampled]
        index = torch.tensor([i for i, _ in sampled], dtype=torch.long, device=logits.device)
        temperature = torch.tensor([s.config.temperature for s in chosen], device=logits.device)
        top_p = torch.tensor([s.config.top_p for s in chosen], device=logits.device)
        uniform = torch.tensor([s.uniform() for s in chosen], device=logits.device)
        tokens[index] = _sample(logits[index], temperature, top_p, uniform)
    return [int(t) for t in tokens.tolist()]


def _sample(logits: Any, temperature: Any, top_p: Any, uniform: Any) -> Any:
    """Temperature, then Hugging Face's top-p rule (drop the low tail holding at most 1 - top_p), then draw."""
    import torch

    scaled = logits / temperature.unsqueeze(-1)
    sorted_logits, sorted_index = torch.sort(scaled, descending=False, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    remove = probs.cumsum(dim=-1) <= (1 - top_p).unsqueeze(-1)
    remove[:, -1] = False
    probs = probs.masked_fill(remove, 0.0)
    cdf = probs.cumsum(dim=-1)
    target = (uniform * cdf[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cdf, target, right=True).clamp(max=logits.shape[-1] - 1)
    return sorted_index.gather(1, pick).squeeze(-1)
