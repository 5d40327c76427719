"""QA records -> conversational prompt/completion examples for TRL, cut to fit ``max_length``.

Each example is ``{"prompt": [system, user], "completion": [assistant]}`` built with
``adapters.prompts.build_messages``, the one layout shared with serving and evaluation. TRL renders it with the
base model's own chat template and, because it is a prompt/completion pair, sets the labels of every prompt
token to -100 (``completion_only_loss``): the loss covers the answer and its end-of-turn token only. This
works for any chat template whose rendering of the prompt is a prefix of the rendering of prompt + answer,
which :func:`check_template_prefix` verifies once per tokenizer, so no ``{% generation %}`` markers are needed.

When an example is longer than ``max_length`` the context is cut (its start is kept), never the question or
the answer: the original notebook truncated whole sequences from the end and trained on cut-off answers.
A record whose question and answer alone exceed ``max_length`` is skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from persona_router.adapters.prompts import build_messages
from persona_router.core.errors import ConfigError, DataError
from persona_router.core.records import QARecord

log = logging.getLogger(__name__)

MIN_CONTEXT_TOKENS = 16  # below this a context fragment is noise; drop it and keep the plain layout


@dataclass(frozen=True)
class ChatExample:
    prompt: list[dict[str, str]]
    completion: list[dict[str, str]]
    tokens: int
    context_truncated: bool = False

    def to_row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "completion": self.completion}


@dataclass
class FormatResult:
    examples: list[ChatExample] = field(default_factory=list)
    skipped: int = 0
    truncated: int = 0

    @property
    def tokens(self) -> int:
        return sum(e.tokens for e in self.examples)


def records_sha256(records: Iterable[QARecord]) -> str:
    """sha256 over the records as canonical JSON lines: the same rows give the same hash from any source."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record.to_json(), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return f"sha256:{digest.hexdigest()}"


def build_examples(records: Sequence[QARecord], *, system_prompt: str, tokenizer: Any,
                   max_length: int, prompt_free_fraction: float = 0.0) -> FormatResult:
    """Format and fit every record; see the module docstring for the truncation rule.

    ``prompt_free_fraction`` of the records (chosen by a hash of the question, so the same rows every run)
    are rendered without the persona's system prompt, so the adapter learns to carry the persona's style on
    its own rather than only in the presence of the prompt.
    """
    if records:
        check_template_prefix(tokenizer)
    result = FormatResult()
    for record in records:
        prompt = None if _question_bucket(record.question, PROMPT_FREE_SALT) < prompt_free_fraction else system_prompt
        example = fit_example(record, system_prompt=prompt, tokenizer=tokenizer, max_length=max_length)
        if example is None:
            result.skipped += 1
            continue
        result.truncated += example.context_truncated
        result.examples.append(example)
    if result.skipped:
        log.warning("skipped %d of %d rows whose question and answer alone exceed max_length=%d tokens",
                    result.skipped, len(records), max_length)
    if result.truncated:
        log.info("cut the context of %d of %d rows to fit max_length=%d", result.truncated, len(records), max_length)
    return result


def fit_example(record: QARecord, *, system_prompt: str | None, tokenizer: Any,
                max_length: int) -> ChatExample | None:
    """One example within ``max_length`` tokens, cutting only the context; None if even that cannot fit."""
    completion = [{"role": "assistant", "content": record.answer}]
    prompt = build_messages(record.question, system_prompt=system_prompt, context=record.context)
    total = count_tokens(tokenizer, prompt, completion)
    if total <= max_length:
        return ChatExample(prompt, completion, total)
    if record.context:
        context_ids = tokenizer(record.context, add_special_tokens=False)["input_ids"]
        budget = len(context_ids) - (total - max_length)
        # Decoding a token prefix and re-encoding can shift a token or two; shrink until it fits.
        for _ in range(8):
            if budget < MIN_CONTEXT_TOKENS:
                break
            cut = tokenizer.decode(context_ids[:budget], skip_special_tokens=True).strip()
            prompt = build_messages(record.question, system_prompt=system_prompt, context=cut)
            total = count_tokens(tokenizer, prompt, completion)
            if total <= max_length:
                return ChatExample(prompt, completion, total, context_truncated=True)
            budget -= max(1, total - max_length)
        prompt = build_messages(record.question, system_prompt=system_prompt, context=None)
        total = count_tokens(tokenizer, prompt, completion)
        if total <= max_length:
            return ChatExample(prompt, completion, total, context_truncated=True)
    return None


def count_tokens(tokenizer: Any, prompt: list[dict[str, str]], completion: list[dict[str, str]]) -> int:
    return len(_render_ids(tokenizer, prompt + completion, add_generation_prompt=False))


def check_template_prefix(tokenizer: Any) -> None:
    """Fail clearly if the chat template renders a prompt differently once an answer follows it.

    TRL finds the answer's first token where prompt and prompt + answer diverge; a template that, say, adds a
    date to the last user turn only would shift that point and put prompt tokens into the loss.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("the base model's tokenizer has no chat template; training needs one to format "
                          "prompts exactly as serving does", field="base")
    prompt = build_messages("Why is the sky blue?", system_prompt="Answer briefly.", context="Light scatters.")
    completion = [{"role": "assistant", "content": "Blue light scatters most."}]
    prompt_ids = _render_ids(tokenizer, prompt, add_generation_prompt=True)
    full_ids = _render_ids(tokenizer, prompt + completion, add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ConfigError("the chat template renders the prompt differently when an answer follows, so the answer "
                          "tokens cannot be told apart from the prompt; use a base with a prefix-preserving "
                          "template", field="base")


PROMPT_FREE_SALT = "prompt-free\x00"


def split_holdout(records: Sequence[QARecord], fraction: float) -> tuple[list[QARecord], list[QARecord]]:
    """Deterministic train/eval split by a hash of each question (stable across row order and machines).

    Rows that ask the same thing (:func:`asked_key`: the question and context up to case and spacing) go to the
    same side, since the overlap check would refuse them on both; see :func:`_side_buckets`.
    """
    if not 0 < fraction < 1:
        return list(records), []
    buckets = _side_buckets(records)
    train: list[QARecord] = []
    held: list[QARecord] = []
    for record in records:
        (held if buckets[asked_key(record)] < fraction else train).append(record)
    if not train:
        raise DataError(f"holding out {fraction:.0%} for evaluation left no training rows", field="eval_fraction")
    return train, held


def asked_key(record: QARecord) -> tuple[str, str]:
    """What a row asks: its question and context, lower-cased with whitespace collapsed."""
    return " ".join(record.question.split()).lower(), " ".join((record.context or "").split()).lower()


def _side_buckets(records: Sequence[QARecord]) -> dict[tuple[str, str], float]:
    """Each :func:`asked_key` group's bucket: that of the lexicographically smallest raw question in it. Any
    row order gives the same choice, and a group whose rows all spell the question alike keeps the bucket of
    that question, so data without such variants splits exactly as it did when each row hashed its own."""
    smallest: dict[tuple[str, str], str] = {}
    for record in records:
        key = asked_key(record)
        smallest[key] = min(smallest.get(key, record.question), record.question)
    return {key: _question_bucket(question) for key, question in smallest.items()}


def _question_bucket(question: str, salt: str = "") -> float:
    """A stable number in [0, 1] per question (same on every machine and row order). Each use has its own
    ``salt``: with one hash for both, the rows held out for evaluation (the lowest buckets) would be the
    rows chosen to train without the system prompt, and the share actually trained that way would fall."""
    return int(hashlib.sha256((salt + question).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _render_ids(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                            return_dict=True)
    return list(encoded["input_ids"])
