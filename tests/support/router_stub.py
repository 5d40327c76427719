"""A stand-in embedder and a three-persona pack for router tests that do not need the real model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from persona_router.core.pack import PersonaPack, pack_from_dict
from persona_router.core.records import RoutingRecord

DIM = 8
PERSONAS = ("alpha", "beta", "gamma")


class StubEncoder:
    """Each persona owns an axis; a question's words pull it toward those axes (unknown words: noise)."""

    model_id = "stub"
    dimension = DIM
    max_seq_length = 16

    def __init__(self, fingerprint: str = "sha256:stub") -> None:
        self.fingerprint = fingerprint
        self.calls = 0

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        self.calls += 1
        rows = []
        for text in texts:
            vector = np.zeros(DIM)
            for word in text.lower().split():
                if word in PERSONAS:
                    vector[PERSONAS.index(word)] += 1.0
                else:
                    seed = sum(map(ord, word)) % 997
                    vector += 0.3 * np.random.default_rng(seed).standard_normal(DIM)
            vector[DIM - 1] += 0.05  # never the zero vector
            rows.append(vector / np.linalg.norm(vector))
        return np.array(rows, dtype=np.float32)


def make_pack(extra_example: str | None = None, source: str = "<memory>") -> PersonaPack:
    personas = []
    for name in PERSONAS:
        examples = [f"{name} question {i}" for i in range(3)]
        if extra_example and name == "alpha":
            examples.append(extra_example)
        personas.append({"name": name, "description": f"the {name} persona", "system_prompt": "be nice",
                         "examples": examples, "fallback": name == "gamma"})
    return pack_from_dict({"name": "stubpack", "personas": personas}, source=source)


def records() -> list[RoutingRecord]:
    rng = np.random.default_rng(0)
    words = ["why", "how", "what", "is", "the", "a", "of", "in", "to", "does"]
    return [RoutingRecord(name, f"{name} " + " ".join(rng.choice(words, 3)))
            for name in PERSONAS for _ in range(12)]
