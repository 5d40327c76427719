"""TRL's ``SFTTrainer`` without a host-device synchronisation after every micro-batch.

TRL's ``compute_loss`` reads the entropy, the token accuracy and the batch's token count back to the host with
``.item()`` after every micro-batch. Each read makes the host wait until the GPU has run everything queued, so
it cannot queue the next kernels while the GPU works; in a step whose host side (PEFT, bitsandbytes and TRL in
Python) is as long as its GPU side, those waits serialise the two. transformers adds two more per micro-batch:
the NaN/Inf check of the loss (``logging_nan_inf_filter``) and the input-token counter
(``include_num_input_tokens_seen``); ``sft_setup.sft_config`` switches both off with ``deferred_metrics``.

With ``deferred_metrics=on`` the training loss is computed exactly as TRL computes it (its fused LM head, the
summed negative log-likelihood over the answer tokens divided by the step's answer-token count), the metric
sums stay on the device and are read once per log line, and the token count of a packed row is its length,
known on the host. The logged entropy and accuracy are then token-weighted over the log interval (TRL averages
per-micro-batch ratios). Everything this path does not cover goes through TRL's own ``compute_loss``
unchanged: evaluation, padded (unpacked) batches, several processes, MoE auxiliary losses, custom loss
functions, label smoothing and the DFT loss.
"""

from __future__ import annotations

from typing import Any

_CLASSES: dict[int, type] = {}


def trainer_class(trl: Any, config: Any) -> type:
    """The trainer class for a resolved config: TRL's own, or the deferred-metrics subclass of it."""
    if config.deferred_metrics != "on":
        return trl.SFTTrainer
    key = id(trl.SFTTrainer)
    if key not in _CLASSES:
        _CLASSES[key] = _deferred_metrics_class(trl.SFTTrainer)
    return _CLASSES[key]


def _deferred_metrics_class(base: type) -> type:
    import torch

    class DeferredMetricsSFTTrainer(base):
        """See the module docstring."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pending_metrics: Any = None  # device tensor: entropy sum, correct tokens, valid tokens

        def _lean_path(self, model: Any, inputs: dict[str, Any]) -> bool:
            return bool(
                model.training
                and "position_ids" in inputs and "attention_mask" not in inputs  # packed rows, no padding
                and self.accelerator.num_processes == 1
                and not self.aux_loss_enabled
                and self.compute_loss_func is None
                and self.label_smoother is None
                and self.args.loss_type == "nll"
                and getattr(self.accelerator, "parallelism_config", None) is None
            )

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if return_outputs or not self._lean_path(model, inputs):
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            # As TRL: clamped so that a micro-batch without answer tokens gives a finite zero, not 0 / 0.
            loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            sums = torch.stack([outputs.entropy.detach().sum().float(), outputs.is_top1.sum().float(),
                                outputs.label_mask.sum().float()])
            self._pending_metrics = sums if self._pending_metrics is None else self._pending_metrics + sums
            # A packed row holds no padding: its length is its real token count, read without a device sync.
            self._total_train_tokens += int(inputs["position_ids"].size(1))
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            pending, self._pending_metrics = self._pending_metrics, None
            if pending is not None:
                entropy, correct, valid = (float(v) for v in pending.tolist())  # the one read per log line
                self._metrics["train"]["entropy"].append(entropy / valid if valid else 0.0)
                self._metrics["train"]["mean_token_accuracy"].append(correct / valid if valid else 0.0)
            super().log(logs, start_time)

    return DeferredMetricsSFTTrainer
