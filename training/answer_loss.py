"""Answer-only loss for CPU training: the LM head runs on the answer positions only, in the autocast dtype.

TRL 1.16's ``SFTTrainer`` computes the loss through its fused LM head. On CUDA that is a Triton kernel over the
answer positions only; on a CPU it falls back to torch ops that score every position of the packed row (prompt
included), upcast each vocabulary tile to float32, build token-by-vocabulary masks for its top-1 metric, and
recompute the LM head in the backward pass in float32 matmuls. On the 135M demo base with a 49k vocabulary that
path cost about as much as the rest of the model (``benchmarks/train_cpu_throughput.py`` measures it).

Here the model is asked for the logits of the answer positions only (transformers' ``logits_to_keep`` with a
tensor of sequence indices), and the loss is ordinary cross-entropy on them, so the matmuls stay in bf16 under
autocast and the backward is autograd's. The value is TRL's: the summed negative log-likelihood of the answer
tokens divided by ``num_items_in_batch`` (the answer tokens of the whole accumulated batch), scaled the same way
under data parallelism. ``tests/unit/test_answer_loss.py`` checks loss, gradients and metrics against TRL's own
path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True)
class AnswerLoss:
    """One micro-batch's loss and the statistics TRL logs (sums over its answer tokens, without gradient)."""

    loss: Any  # 0-d tensor with gradient
    answer_tokens: Any  # 0-d tensor
    entropy_sum: Any  # 0-d tensor
    correct: Any  # 0-d tensor


def answer_only_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> AnswerLoss:
    """Cross-entropy of the next-token labels that are not ``-100``, with logits computed only where needed."""
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    model_inputs["use_cache"] = False
    targets_all = labels[:, 1:]
    mask = targets_all != IGNORE_INDEX
    # Positions whose next token is an answer token in any row; for a packed batch (one row) exactly the answer.
    keep = mask.any(dim=0).nonzero().squeeze(-1)
    logits = model(**model_inputs, logits_to_keep=keep).logits  # [batch, len(keep), vocab]
    targets = targets_all[:, keep]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    flat_targets = targets.reshape(-1)
    loss_sum = F.nll_loss(log_probs.reshape(-1, log_probs.size(-1)), flat_targets, ignore_index=IGNORE_INDEX,
                          reduction="sum")
    answer_tokens = mask.sum()
    denominator = answer_tokens.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    with torch.no_grad():
        valid = targets != IGNORE_INDEX
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        entropy_sum = (entropy * valid).sum()
        correct = ((log_probs.argmax(-1) == targets) & valid).sum()
    return AnswerLoss(loss_sum / torch.as_tensor(denominator), answer_tokens, entropy_sum, correct)


def answer_loss_trainer_class(sft_trainer: type) -> type:
    """``SFTTrainer`` with :func:`answer_only_loss` for CPU models (CUDA keeps TRL's Triton path)."""
    import torch

    class AnswerLossSFTTrainer(sft_trainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if return_outputs or "labels" not in inputs or self.model.device.type != "cpu":
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            result = answer_only_loss(model, inputs, num_items_in_batch)
            loss = result.loss
            # As TRL: num_items_in_batch counts every rank's tokens and DDP averages gradients over ranks.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            self._log_answer_metrics(mode, inputs, result)
            return loss

        def _log_answer_metrics(self, mode: str, inputs: dict[str, Any], result: AnswerLoss) -> None:
            # The same keys and reductions as SFTTrainer.compute_loss, so logs and callbacks read the same.
            gather = self.accelerator.gather_for_metrics
            valid = gather(result.answer_tokens).sum()
            entropy_sum, correct = gather(result.entropy_sum).sum(), gather(result.correct).sum()
            metrics = self._metrics[mode]
            metrics["entropy"].append((entropy_sum / valid).item() if valid > 0 else 0.0)
            metrics["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
            if mode == "train":
                if "attention_mask" in inputs:
                    tokens = gather(inputs["attention_mask"].sum()).sum().item()
                else:
                    ids = inputs["position_ids"]
                    tokens = gather(torch.tensor(ids.size(1), device=ids.device)).sum().item()
                self._total_train_tokens += tokens // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]

    return AnswerLossSFTTrainer
