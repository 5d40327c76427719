"""Three short student records and a trainer over them on the tiny random model, for tests of what training sees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persona_router.core.records import QARecord

SYSTEM = "explain simply"
RECORDS = [
    QARecord(persona="student", question="why is the sky blue?", answer="light scatters in air."),
    QARecord(persona="student", question="what does the heart do?", answer="the heart pumps blood.",
             context="a student asks a question and a teacher answers it."),
    QARecord(persona="student", question="is code fast?", answer="code runs fast. the quick brown fox jumps."),
]


def tiny_trainer(base: Any, work: Path, *, packing: bool, **overrides: Any) -> Any:
    """``build_trainer`` for RECORDS (one batch of all three, one step) with CPU defaults plus ``overrides``."""
    from persona_router.training.config import TrainConfig
    from persona_router.training.formatting import build_examples
    from persona_router.training.trainer import build_trainer

    config = TrainConfig(packing=packing, batch_size=len(RECORDS), max_length=512, max_steps=1,
                         **overrides).resolved("cpu")
    formatted = build_examples(RECORDS, system_prompt=SYSTEM, tokenizer=base.tokenizer, max_length=512)
    empty = build_examples([], system_prompt=SYSTEM, tokenizer=base.tokenizer, max_length=512)
    trainer, _, _ = build_trainer(base, config, formatted, empty, work)
    return trainer
