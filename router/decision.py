"""The router's answer for one question: which persona, how it was chosen, and how sure it is."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from persona_router.core.errors import ConfigError, choices

Source = Literal["explicit", "inferred", "fallback"]
SOURCES: tuple[Source, ...] = ("explicit", "inferred", "fallback")


@dataclass(frozen=True)
class Decision:
    """One routing decision.

    ``explicit``: the request named ``persona``; no classifier ran, ``confidence`` is 1.
    ``inferred``: the classifier's top persona cleared its threshold; ``confidence`` is its calibrated
    probability. ``fallback``: it did not, so ``persona`` is the pack's fallback and ``reason`` says why.
    In both inferred cases ``runner_up`` is the most probable persona other than ``persona`` (for a fallback,
    usually the guess that was rejected) and ``confidence`` is the probability of ``persona`` itself.
    """

    persona: str
    source: Source
    confidence: float
    runner_up: str | None = None
    runner_up_score: float | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"{self.source!r} is not valid; valid: {choices(SOURCES)}", field="source")
        if not 0.0 <= self.confidence <= 1.0:
            raise ConfigError(f"{self.confidence} must lie in [0, 1]", field="confidence")
        if self.source == "fallback" and not self.reason:
            raise ConfigError("a fallback decision must say why", field="reason")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def explicit(persona: str) -> Decision:
    return Decision(persona=persona, source="explicit", confidence=1.0)
