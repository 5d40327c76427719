"""The demo dataset meets its card: counts, parallel questions, held-out splits disjoint from training."""

from __future__ import annotations

from collections import Counter

from persona_router.core.pack import load_pack
from persona_router.core.rows import demo_qa, demo_routing


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_counts_per_persona() -> None:
    names = set(load_pack().names)
    train, test = Counter(r.persona for r in demo_qa("train")), Counter(r.persona for r in demo_qa("test"))
    routing = Counter(r.persona for r in demo_routing("train"))
    routing_test = Counter(r.persona for r in demo_routing("test"))
    assert set(train) == set(test) == set(routing) == set(routing_test) == names
    assert min(train.values()) >= 80
    assert min(test.values()) >= 20
    assert min(routing.values()) >= 40
    assert min(routing_test.values()) >= 20


def test_at_least_40_questions_answered_by_all_five_personas() -> None:
    by_question: dict[str, set[str]] = {}
    for record in demo_qa("train"):
        by_question.setdefault(record.question, set()).add(record.persona)
    assert sum(len(personas) == 5 for personas in by_question.values()) >= 40


def test_held_out_splits_never_appear_in_training_files() -> None:
    seen = {_norm(r.question) for r in demo_qa("train")} | {_norm(r.question) for r in demo_routing("train")}
    assert not [r.question for r in demo_routing("test") if _norm(r.question) in seen]
    assert not [r.question for r in demo_qa("test") if _norm(r.question) in seen]


def test_ids_are_unique() -> None:
    ids = [r.id for r in demo_qa("train") + demo_qa("test")]
    assert None not in ids and len(ids) == len(set(ids))
