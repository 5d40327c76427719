"""What the model is trained on: labels of a collated batch, and packing without cross-example attention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from persona_router.core.records import QARecord

from tests.support.tiny_training import RECORDS, SYSTEM, tiny_trainer


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> Any:
    from persona_router.adapters.base_model import BaseModelConfig, load_base

    return load_base(BaseModelConfig(base=str(tiny_model_dir)), for_training=True)


def _trainer(base: Any, tmp_path: Path, *, packing: bool) -> Any:
    return tiny_trainer(base, tmp_path / f"work-{packing}", packing=packing)


def _expected_answer_ids(tokenizer: Any, record: QARecord) -> list[int]:
    from persona_router.adapters.prompts import build_messages

    prompt = build_messages(record.question, system_prompt=SYSTEM, context=record.context)
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": record.answer}],
                                         tokenize=True, return_dict=True)["input_ids"]
    return list(full[len(prompt_ids):])


def _labelled_spans(labels: list[int]) -> list[list[int]]:
    spans: list[list[int]] = []
    current: list[int] = []
    for label in [*labels, -100]:
        if label != -100:
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    return spans


@pytest.mark.parametrize("packing", [False, True])
def test_only_the_answer_and_its_end_of_turn_carry_labels(base: Any, tmp_path: Path, packing: bool) -> None:
    trainer = _trainer(base, tmp_path, packing=packing)
    batch = next(iter(trainer.get_train_dataloader()))
    spans = [span for row in batch["labels"].tolist() for span in _labelled_spans(row)]
    expected = [_expected_answer_ids(base.tokenizer, r) for r in RECORDS]
    assert sorted(spans) == sorted(expected)
    end_of_turn = base.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for span, record in zip(sorted(spans), sorted(expected), strict=True):
        assert span == record and end_of_turn in span  # the model learns to stop
        text = base.tokenizer.decode(span)
        assert any(text.startswith(r.answer) for r in RECORDS)
    # Every labelled token equals the input token it labels (labels are not shifted by the collator).
    ids = batch["input_ids"]
    mask = batch["labels"] != -100
    assert (batch["labels"][mask] == ids[mask]).all()
    if packing:
        assert "attention_mask" not in batch and "position_ids" in batch and ids.shape[0] == 1
    trainer.model.unload()  # give the fixture's base back without LoRA layers


def test_packed_batch_loss_equals_padded_batch_loss(base: Any, tmp_path: Path) -> None:
    """Packing flattens examples into one row; if attention leaked across them the loss would change."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trainer = _trainer(base, tmp_path, packing=False)
    model = trainer.model.eval()
    rows = [trainer.train_dataset[i] for i in range(len(RECORDS))]
    examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    pad_id = base.tokenizer.pad_token_id
    padded = DataCollatorForLanguageModeling(pad_token_id=pad_id)(examples)
    flat = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)(examples)
    with torch.no_grad():
        loss_padded = trainer.compute_loss(model, dict(padded))
        loss_flat = trainer.compute_loss(model, dict(flat))
        # Control: the same flat row with positions that do not restart lets attention cross examples.
        leaky = {k: v for k, v in flat.items() if k in ("input_ids", "labels")}
        leaky["position_ids"] = torch.arange(flat["input_ids"].shape[1])[None]
        loss_leaky = trainer.compute_loss(model, leaky)
    assert torch.allclose(loss_padded, loss_flat, atol=1e-5), (loss_padded, loss_flat)
    assert not torch.allclose(loss_padded, loss_leaky, atol=1e-3)
    trainer.model.unload()
