"""Translate a resolved :class:`TrainConfig` into PEFT's ``LoraConfig`` and TRL's ``SFTConfig``.

Kept apart from the orchestration so ``benchmarks/train_gpu.py`` measures exactly the arguments that
``persona-router train`` uses.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from persona_router.core.errors import ConfigError
from persona_router.training.config import TrainConfig
from persona_router.training.distributed import world

log = logging.getLogger(__name__)


def require_trl() -> Any:
    try:
        import trl
    except ImportError as exc:
        raise ConfigError("training needs TRL: pip install 'trl>=1.16,<2'", field="trl") from exc
    return trl


def lora_config(config: TrainConfig) -> Any:
    """LoRA on every linear layer but the LM head, no ``modules_to_save``: the format vLLM and PEFT both load."""
    from peft import LoraConfig

    if config.lora_dropout is None:
        raise ConfigError("resolve the config for a device first (TrainConfig.resolved)", field="lora_dropout")
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_module_list(),
        bias="none",
        task_type="CAUSAL_LM",
        modules_to_save=None,
    )


def sft_config(config: TrainConfig, *, output_dir: Path, device: str, eval_rows: int = 0,
               completion_only_loss: bool = True) -> Any:
    """The TRL arguments for a config already passed through :meth:`TrainConfig.resolved`."""
    batch, accum, lr = config.batch_size, config.grad_accum, config.learning_rate
    if batch is None or accum is None or lr is None or config.max_length is None:
        raise ConfigError("resolve the config for a device first (TrainConfig.resolved)", field="config")
    trl = require_trl()
    mixed = config.mixed_precision
    if device == "cpu" and mixed == "fp16":
        raise ConfigError("fp16 mixed precision needs CUDA; on CPU use 'bf16' (CPUs with AVX512-BF16/AMX) or 'no'",
                          field="mixed_precision")
    optim = config.optim
    if device == "cpu" and optim in ("paged_adamw_8bit", "adamw_8bit"):
        raise ConfigError(f"{optim!r} needs CUDA; on CPU use 'adamw_torch'", field="optim")
    checkpointing = config.gradient_checkpointing in ("on", "reentrant")
    offload = config.activation_offloading == "on"
    if offload and device != "cuda":
        raise ConfigError("activation offloading moves activations from the GPU to host memory; it needs CUDA",
                          field="activation_offloading")
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": batch,
        "per_device_eval_batch_size": max(batch, 4),
        "gradient_accumulation_steps": accum,
        "learning_rate": lr,
        "lr_scheduler_type": config.lr_scheduler,
        # transformers 5 reads a float below 1 as a ratio of the total steps.
        "warmup_steps": config.warmup_ratio,
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "optim": optim,
        "num_train_epochs": config.epochs or 1.0,
        "max_steps": config.max_steps or -1,
        "max_length": config.max_length,
        "packing": config.packing,
        "packing_strategy": "bfd",
        # Packing without padding relies on position_ids restarting per example: "varlen" attention runs each
        # example on its own, eager/SDPA get a block-diagonal mask from transformers
        # (tests/unit/test_training_cuda_kernels.py checks that both give the same logits and gradients).
        "padding_free": config.packing,
        "completion_only_loss": completion_only_loss,
        "bf16": mixed == "bf16",
        "fp16": mixed == "fp16",
        "gradient_checkpointing": checkpointing,
        "gradient_checkpointing_kwargs": ({"use_reentrant": config.gradient_checkpointing == "reentrant"}
                                          if checkpointing else None),
        "activation_offloading": offload,
        "logging_steps": config.logging_steps,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": 1,
        "eval_strategy": "no",
        "seed": config.seed,
        "data_seed": config.seed,
        "report_to": "none",
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_num_workers": 0,
        "use_cpu": device == "cpu",
        "disable_tqdm": False,
        "dataset_num_proc": None,
        "shuffle_dataset": False,
    }
    if config.deferred_metrics == "on":
        # Both checks read a device value back after every micro-batch (training/lean_trainer.py). A NaN loss
        # then reaches the logged training loss, which refuse_diverged reads, instead of being averaged away.
        kwargs["logging_nan_inf_filter"] = False
        kwargs["include_num_input_tokens_seen"] = "no"
    if eval_rows:
        kwargs["eval_packing"] = False
    if world().distributed:
        # LoRA uses every adapter weight in every step; gloo is the CPU backend (tests), NCCL the GPU one.
        kwargs["ddp_find_unused_parameters"] = False
        kwargs["ddp_backend"] = "nccl" if device == "cuda" else "gloo"
    return trl.SFTConfig(**supported_kwargs(trl.SFTConfig, kwargs, warmup_ratio=config.warmup_ratio))


def supported_kwargs(config_class: Any, kwargs: dict[str, Any], *, warmup_ratio: float) -> dict[str, Any]:
    """Keep the arguments this TRL/transformers version knows; say which were dropped.

    The GPU benchmark machine may carry other minor versions than this one, and a renamed optional argument
    should cost a warning, not the run. Warm-up moved from ``warmup_ratio`` to a fractional ``warmup_steps``
    in transformers 5; older versions get the ratio under its old name.
    """
    known = {f.name: f for f in dataclasses.fields(config_class)}
    if "float" not in str(known["warmup_steps"].type) and "warmup_ratio" in known:
        kwargs = {**kwargs, "warmup_steps": 0, "warmup_ratio": warmup_ratio}
    dropped = sorted(k for k in kwargs if k not in known)
    if dropped:
        log.warning("this TRL/transformers version has no %s; running without them", dropped)
    return {k: v for k, v in kwargs.items() if k in known}
