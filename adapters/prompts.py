"""Chat messages for one question: the persona's system prompt, optional context, the question."""

from __future__ import annotations

from typing import Any


def build_messages(question: str, *, system_prompt: str | None, context: str | None = None) -> list[dict[str, str]]:
    """The one prompt layout that training, serving and evaluation share."""
    user = f"Context:\n{context.strip()}\n\nQuestion:\n{question.strip()}" if context else question.strip()
    messages: list[dict[str, str]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt.strip()})
    messages.append({"role": "user", "content": user})
    return messages


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat prompt, ending where the assistant's answer starts."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])
