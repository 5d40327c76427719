"""The CPU answer-only loss equals TRL's fused-LM-head loss: value, gradients and logged metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.tiny_training import tiny_trainer


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> Any:
    from persona_router.adapters.base_model import BaseModelConfig, load_base

    return load_base(BaseModelConfig(base=str(tiny_model_dir)), for_training=True)


def _trainer(base: Any, tmp_path: Path, *, packing: bool) -> Any:
    # float32 even on a bf16 CPU: the comparison with TRL's loss is exact only without autocast.
    return tiny_trainer(base, tmp_path / f"work-{packing}", packing=packing, mixed_precision="no")


def _loss_and_grads(trainer: Any, compute: Any, batch: dict[str, Any], n_items: Any) -> tuple[float, dict[str, Any]]:
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = compute(model, dict(batch), num_items_in_batch=n_items)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("packing", [True, False])
def test_answer_only_loss_equals_trl_loss_gradients_and_metrics(base: Any, tmp_path: Path, packing: bool) -> None:
    import torch
    import trl

    trainer = _trainer(base, tmp_path, packing=packing)
    assert type(trainer).__name__ == "AnswerLossSFTTrainer"
    model = trainer.model
    model.train()
    # Non-zero LoRA B so that every adapter weight gets a gradient worth comparing.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    n_items = (batch["labels"][:, 1:] != -100).sum()
    assert 0 < int(n_items) < batch["labels"].numel() - batch["labels"].shape[0]  # prompts are not scored

    ours, our_grads = _loss_and_grads(trainer, trainer.compute_loss, batch, n_items)
    ours_metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    theirs, their_grads = _loss_and_grads(trainer, lambda *a, **k: trl.SFTTrainer.compute_loss(trainer, *a, **k),
                                          batch, n_items)
    theirs_metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}

    assert ours == pytest.approx(theirs, rel=1e-5)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert ours_metrics["entropy"] == pytest.approx(theirs_metrics["entropy"], rel=1e-4)
    assert ours_metrics["mean_token_accuracy"] == pytest.approx(theirs_metrics["mean_token_accuracy"])
    # num_tokens is a running total over both calls; each call adds the batch's tokens once.
    assert theirs_metrics["num_tokens"][0] == 2 * ours_metrics["num_tokens"][0] > 0


def test_a_batch_without_answer_tokens_gives_a_finite_zero_loss_that_backpropagates(base: Any,
                                                                                   tmp_path: Path) -> None:
    import torch
    from persona_router.training.answer_loss import answer_only_loss

    trainer = _trainer(base, tmp_path, packing=True)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batch["labels"] = torch.full_like(batch["labels"], -100)
    result = answer_only_loss(trainer.model, batch)
    assert float(result.loss) == 0.0 and int(result.answer_tokens) == 0
    result.loss.backward()  # connected to the graph: no "does not require grad" error
