"""Decide what each persona trains and evaluates on, and refuse bad input before any training starts.

With no ``--data`` the demo dataset is used: its train split for gradient steps and its test split for eval
loss only. With ``--data`` the eval rows come from ``--eval-data`` or, failing that, a deterministic
``eval_fraction`` of each persona's rows, held out by a hash of the question (rows asking the same question
with the same context, up to case and spacing, stay on one side). Every persona asked for is
checked up front, so ``--all`` never trains half the pack and then fails on a persona without rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from persona_router.core.errors import DataError
from persona_router.core.pack import Persona, PersonaPack
from persona_router.core.records import QARecord
from persona_router.core.rows import demo_qa
from persona_router.training.formatting import asked_key, split_holdout
from persona_router.training.loading import load_qa

log = logging.getLogger(__name__)

DEMO_SOURCE = "demo (training/demo_data/<persona>/qa_train.jsonl)"
DEMO_EVAL_SOURCE = "demo test split (qa_test.jsonl; eval loss only, never trained on)"


@dataclass(frozen=True)
class PersonaJob:
    """One persona's rows: trained on ``train_records``, evaluated (never trained) on ``eval_records``."""

    persona: Persona
    train_records: list[QARecord]
    eval_records: list[QARecord]
    data_source: str
    eval_source: str


def plan_jobs(pack: PersonaPack, names: Sequence[str], *, data: str | None = None, eval_data: str | None = None,
              eval_fraction: float = 0.1, skip_missing: bool = False) -> list[PersonaJob]:
    for name in names:
        pack.get(name)  # UnknownPersonaError names the valid ones
    train_rows, eval_rows, source, eval_source = _load_rows(pack, data, eval_data)
    jobs: list[PersonaJob] = []
    missing: list[str] = []
    for name in names:
        train = [r for r in train_rows if r.persona == name]
        if eval_rows is None:
            train, held = split_holdout(train, eval_fraction) if train else ([], [])
            where = f"held-out {eval_fraction:.0%} of {data} (by question hash)"
        else:
            held = [r for r in eval_rows if r.persona == name]
            where = eval_source
        if not train:
            missing.append(name)
            continue
        _refuse_overlap(name, train, held)
        jobs.append(PersonaJob(pack.get(name), train, held, source, where))
    if missing:
        message = f"no training rows for persona(s) {', '.join(missing)} in {source}"
        if not skip_missing:
            raise DataError(f"{message}; add rows, train the others with --persona, or pass --skip-missing",
                            field="persona")
        log.warning("%s; skipping them", message)
    if not jobs:
        raise DataError(f"no persona has training rows in {source}", field="persona")
    return jobs


def _load_rows(pack: PersonaPack, data: str | None,
               eval_data: str | None) -> tuple[list[QARecord], list[QARecord] | None, str, str]:
    if data is None:
        train = [r for r in demo_qa("train") if r.persona in pack]
        held = load_qa(eval_data, pack, split="test").records if eval_data else demo_qa("test")
        return train, held, DEMO_SOURCE, eval_data or DEMO_EVAL_SOURCE
    loaded = load_qa(data, pack)
    log.info("%s", loaded.report.summary())
    held_rows = load_qa(eval_data, pack, split="test").records if eval_data else None
    return loaded.records, held_rows, str(data), str(eval_data) if eval_data else ""


def _refuse_overlap(name: str, train: list[QARecord], held: list[QARecord]) -> None:
    """Held-out rows must ask what the training rows do not (the question, with its context): an answer to a
    trained question (even a different answer) measures recall of that question, not held-out data. Rows
    that share a question template over different contexts (summarise this review) stay distinct."""
    seen = {asked_key(r) for r in train}
    shared = [r for r in held if asked_key(r) in seen]
    if shared:
        raise DataError(f"{len(shared)} eval rows of persona {name!r} ask a question the training rows ask too "
                        f"(e.g. {shared[0].question[:60]!r}); eval loss would not measure held-out data",
                        field="eval-data")
