"""Map free-text audience labels (Webscale-RL's ``persona`` column) onto a pack's personas.

First an exact match of the normalised label against each persona's name and aliases; then, optionally,
embedding similarity between the label and each persona's description and aliases, accepted only above a
threshold. Labels that map nowhere are counted and reported by the loader, never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from persona_router.core.errors import ConfigError
from persona_router.core.pack import PersonaPack

EmbedFn = Callable[[Sequence[str]], "list[list[float]]"]


def normalise_label(label: str) -> str:
    text = re.sub(r"\s+", " ", label.strip().lower())
    return text


def _singular(text: str) -> str:
    return text[:-1] if text.endswith("s") and not text.endswith("ss") else text


@dataclass(frozen=True)
class PersonaMapping:
    """Exact/alias lookup, plus an optional similarity fallback above ``threshold``."""

    aliases: dict[str, str]
    threshold: float | None = None
    embed: EmbedFn | None = field(default=None, compare=False, repr=False)
    _targets: tuple[tuple[str, tuple[float, ...]], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"{self.threshold} must be in (0, 1]", field="threshold")
        if self.threshold is not None and self.embed is None:
            raise ConfigError("similarity mapping needs an embedding function", field="embed")

    @classmethod
    def from_pack(cls, pack: PersonaPack, *, threshold: float | None = None,
                  embed: EmbedFn | None = None) -> PersonaMapping:
        aliases: dict[str, str] = {}
        for persona in pack.personas:
            for label in (persona.name, persona.name.replace("-", " "), *persona.aliases):
                key = _singular(normalise_label(label))
                if aliases.get(key, persona.name) != persona.name:
                    raise ConfigError(f"alias {label!r} is claimed by {aliases[key]!r} and {persona.name!r}",
                                      field="aliases")
                aliases[key] = persona.name
        targets: tuple[tuple[str, tuple[float, ...]], ...] = ()
        if threshold is not None and embed is not None:
            texts = [f"{p.name}: {p.description}" for p in pack.personas]
            vectors = embed(texts)
            targets = tuple((p.name, tuple(map(float, v))) for p, v in zip(pack.personas, vectors, strict=True))
        return cls(aliases=aliases, threshold=threshold, embed=embed, _targets=targets)

    def map_label(self, label: str) -> tuple[str | None, str]:
        """Return (persona or None, how: 'exact', 'similarity' or 'unmapped')."""
        key = _singular(normalise_label(label))
        if key in self.aliases:
            return self.aliases[key], "exact"
        if self.threshold is not None and self.embed is not None and self._targets:
            vector = self.embed([label.strip()])[0]
            best_name, best_score = max(
                ((name, _cosine(vector, target)) for name, target in self._targets), key=lambda item: item[1]
            )
            if best_score >= self.threshold:
                return best_name, "similarity"
        return None, "unmapped"


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = (sum(x * x for x in a) ** 0.5) * (sum(y * y for y in b) ** 0.5)
    return dot / norm if norm else 0.0
