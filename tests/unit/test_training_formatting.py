"""Formatting: contexts are cut to fit, questions and answers never; prefix check; stable hashes and splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from persona_router.core.errors import ConfigError
from persona_router.core.records import QARecord
from persona_router.training.formatting import (
    build_examples,
    check_template_prefix,
    count_tokens,
    fit_example,
    records_sha256,
    split_holdout,
)

SYSTEM = "explain simply"
QUESTION = "why is the sky blue?"
ANSWER = "light scatters in air. the quick brown fox jumps over the lazy dog."
CONTEXT = " ".join(["the heart pumps blood. code runs fast. a student asks a question."] * 30)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _length(tok: Any, record: QARecord, *, context: str | None) -> int:
    from persona_router.adapters.prompts import build_messages

    prompt = build_messages(record.question, system_prompt=SYSTEM, context=context)
    return count_tokens(tok, prompt, [{"role": "assistant", "content": record.answer}])


def test_short_examples_are_untouched(tokenizer: Any) -> None:
    record = QARecord(persona="student", question=QUESTION, answer=ANSWER, context="the heart pumps blood.")
    example = fit_example(record, system_prompt=SYSTEM, tokenizer=tokenizer, max_length=4096)
    assert example is not None and not example.context_truncated
    assert "the heart pumps blood." in example.prompt[-1]["content"]
    assert example.completion == [{"role": "assistant", "content": ANSWER}]


def test_truncation_cuts_the_context_and_keeps_question_and_answer(tokenizer: Any) -> None:
    record = QARecord(persona="student", question=QUESTION, answer=ANSWER, context=CONTEXT)
    full = _length(tokenizer, record, context=CONTEXT)
    bare = _length(tokenizer, record, context=None)
    max_length = (full + bare) // 2  # room for part of the context
    example = fit_example(record, system_prompt=SYSTEM, tokenizer=tokenizer, max_length=max_length)
    assert example is not None and example.context_truncated
    assert example.tokens <= max_length
    user = example.prompt[-1]["content"]
    assert user.endswith(f"Question:\n{QUESTION}")  # the question is whole
    assert example.completion[0]["content"] == ANSWER  # the answer is whole
    kept = user.split("Context:\n", 1)[1].split("\n\nQuestion:", 1)[0]
    assert 0 < len(kept) < len(CONTEXT) and CONTEXT.startswith(kept)  # the start of the context is kept
    assert max_length - example.tokens < 16  # and it uses the room it has


def test_no_room_for_context_drops_it_and_too_long_rows_are_skipped(tokenizer: Any) -> None:
    record = QARecord(persona="student", question=QUESTION, answer=ANSWER, context=CONTEXT)
    bare = _length(tokenizer, record, context=None)
    example = fit_example(record, system_prompt=SYSTEM, tokenizer=tokenizer, max_length=bare + 2)
    assert example is not None and example.context_truncated and "Context:" not in example.prompt[-1]["content"]
    result = build_examples([record, QARecord(persona="student", question=QUESTION, answer=ANSWER * 40)],
                            system_prompt=SYSTEM, tokenizer=tokenizer, max_length=bare + 2)
    assert (len(result.examples), result.skipped, result.truncated) == (1, 1, 1)


def test_template_that_is_not_prefix_preserving_is_refused(tokenizer: Any) -> None:
    import copy

    odd = copy.deepcopy(tokenizer)
    # Renders the last user turn differently when no answer follows: the answer start cannot be located.
    odd.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if loop.last and add_generation_prompt %} [answer now]{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(ConfigError, match="prefix-preserving"):
        check_template_prefix(odd)
    odd.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        check_template_prefix(odd)


def test_records_hash_and_holdout_are_stable() -> None:
    records = [QARecord(persona="student", question=f"question {i}?", answer="an answer") for i in range(200)]
    assert records_sha256(records) == records_sha256(list(records))
    assert records_sha256(records) != records_sha256(records[1:])
    train, held = split_holdout(records, 0.1)
    assert len(train) + len(held) == 200 and 5 <= len(held) <= 40
    assert split_holdout(list(reversed(records)), 0.1)[1] == list(reversed(held))  # by content, not position
    assert not {r.question for r in train} & {r.question for r in held}


def test_holdout_split_of_rows_without_variants_is_the_recorded_one() -> None:
    """Recorded results depend on this split: each row's side is still the hash of its own question (held-out
    rows pinned from before variants were grouped), rows sharing a question over other contexts included."""
    from persona_router.training.formatting import _question_bucket

    records = [QARecord(persona="student", question=f"question {i}?", answer="an answer") for i in range(200)]
    _, held = split_holdout(records, 0.1)
    assert [records.index(r) for r in held] == [2, 10, 23, 43, 69, 79, 88, 90, 92, 101, 105, 108, 113, 122, 124,
                                                125, 130, 142, 147, 152, 178, 180, 194, 199]
    templated = [QARecord(persona="student", question=f"Summarise this {i % 7}.", answer="a", context=f"text {i}")
                 for i in range(60)]
    _, held = split_holdout(templated, 0.3)
    assert held == [r for r in templated if _question_bucket(r.question) < 0.3]


def test_rows_asking_the_same_up_to_case_and_spacing_land_on_one_side() -> None:
    """Else the overlap check refuses the split it made itself (field eval-data, without --eval-data)."""
    from persona_router.training.formatting import _question_bucket

    pairs = [(f"What is a stroke {i}?", f"what  is a STROKE {i}? ") for i in range(300)]
    # The test has teeth: hashing each spelling on its own puts some pairs on opposite sides.
    assert any((_question_bucket(a) < 0.1) != (_question_bucket(b) < 0.1) for a, b in pairs)
    records = [QARecord(persona="student", question=q, answer="an answer", context="Same context.")
               for pair in pairs for q in pair]
    for rows in (records, list(reversed(records))):
        _, held = split_holdout(rows, 0.1)
        held_questions = {r.question for r in held}
        assert held and all((a in held_questions) == (b in held_questions) for a, b in pairs)
        # The side is that of the smallest spelling, whichever row comes first.
        assert all((a in held_questions) == (_question_bucket(min(a, b)) < 0.1) for a, b in pairs)


def test_prompt_free_fraction_drops_the_system_prompt_from_a_stable_share_of_rows(tokenizer: Any) -> None:
    from persona_router.training.formatting import build_examples

    records = [QARecord(persona="student", question=f"{QUESTION} {k}", answer=ANSWER) for k in range(40)]

    def without_system(fraction: float) -> list[int]:
        result = build_examples(records, system_prompt=SYSTEM, tokenizer=tokenizer, max_length=512,
                                prompt_free_fraction=fraction)
        return [k for k, e in enumerate(result.examples) if e.prompt[0]["role"] != "system"]

    assert without_system(0.0) == [] and without_system(1.0) == list(range(40))
    half = without_system(0.5)
    assert 10 <= len(half) <= 30 and half == without_system(0.5)  # the same rows every run
    assert set(without_system(0.25)) <= set(half)  # a hash threshold: raising it only adds rows


def test_the_prompt_free_share_holds_among_the_rows_left_after_the_holdout(tokenizer: Any) -> None:
    """The eval split and the prompt-free choice hash the question separately: after holding out 30%, half
    of the training rows still go without the system prompt, as the manifest records."""
    from persona_router.training.formatting import build_examples, split_holdout

    records = [QARecord(persona="student", question=f"{QUESTION} {k}", answer=ANSWER) for k in range(400)]
    train, _ = split_holdout(records, 0.3)
    result = build_examples(train, system_prompt=SYSTEM, tokenizer=tokenizer, max_length=512, prompt_free_fraction=0.5)
    share = sum(e.prompt[0]["role"] != "system" for e in result.examples) / len(result.examples)
    assert 0.42 <= share <= 0.58, share  # ~280 rows; it was 0.30 with one hash for both
