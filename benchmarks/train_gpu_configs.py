"""The data and the configurations of ``benchmarks/train_gpu.py``: synthetic rows, the two datasets, the
notebook's arguments and the names of ours (``variant_overrides``). Split off so the entry point stays short."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

SYSTEM_TOKENS = 40
CONTEXT_RANGE = (200, 6000)  # log-uniform, tokens
QUESTION_RANGE = (12, 40)
ANSWER_RANGE = (4, 60)  # Webscale-RL answers are short verifiable facts
MAX_LENGTH = 1024


def synthetic_rows(count: int, vocab: int, *, seed: int = 0) -> list[dict[str, list[int]]]:
    """Token-id rows: prompt (system + context + question) and completion (answer), uncut."""
    rng = random.Random(seed)
    low = 16  # keep clear of the special/pad ids of the helper tokenizer

    def ids(n: int) -> list[int]:
        return [rng.randrange(low, vocab) for _ in range(n)]

    rows = []
    system = ids(SYSTEM_TOKENS)
    for _ in range(count):
        context = ids(int(math.exp(rng.uniform(math.log(CONTEXT_RANGE[0]), math.log(CONTEXT_RANGE[1])))))
        question = ids(rng.randint(*QUESTION_RANGE))
        answer = ids(rng.randint(*ANSWER_RANGE))
        rows.append({"system": system, "context": context, "question": question, "answer": answer})
    return rows


def notebook_dataset(rows: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    # The whole sequence is the text; TRL cuts it to max_length from the end, as the notebook did.
    return [{"input_ids": r["system"] + r["context"] + r["question"] + r["answer"]} for r in rows]


def ours_dataset(rows: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    # The same cut as training/formatting.py, on token ids: only the context shrinks.
    out = []
    for r in rows:
        fixed = len(r["system"]) + len(r["question"]) + len(r["answer"])
        context = r["context"][: max(0, max_length - fixed)]
        prompt = r["system"] + context + r["question"]
        out.append({"input_ids": prompt + r["answer"], "completion_mask": [0] * len(prompt) + [1] * len(r["answer"])})
    return out


def notebook_args(output_dir: Path, steps: int, *, smoke: bool, bf16: bool = False) -> Any:
    import trl
    from persona_router.training.sft_setup import supported_kwargs

    kwargs = {
        "output_dir": str(output_dir), "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
        "learning_rate": 2e-4, "weight_decay": 0.001, "max_grad_norm": 0.3, "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03, "optim": "adamw_torch" if smoke else "paged_adamw_8bit", "fp16": not smoke and not bf16,
        "bf16": bf16 and not smoke, "gradient_checkpointing": True, "max_length": MAX_LENGTH, "packing": False,
        "completion_only_loss": False, "max_steps": steps, "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "use_cpu": smoke, "disable_tqdm": True, "dataloader_num_workers": 0,
    }
    return trl.SFTConfig(**supported_kwargs(trl.SFTConfig, kwargs, warmup_ratio=0.03))


SPEED_FLAGS = ("liger", "offload", "compile", "lean", "reent")
NOTEBOOK_LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05}  # the notebook's LoraConfig
MICRO_BATCHES = {"b1": 1, "b2": 2, "b4": 4, "b8": 8}


def variant_overrides(name: str) -> dict[str, Any]:
    """TrainConfig overrides (on top of the defaults) for an ``ours``-style name."""
    if name == "ours":
        return {}
    parts = name.split("-")
    attention, flags, micro = parts[0], set(parts[1:-1]), parts[-1]
    layer_offload = [f for f in flags if f.startswith("off") and f[3:].isdigit()]
    flags -= set(layer_offload)
    if (attention not in ("sdpa", "varlen") or micro not in MICRO_BATCHES or not flags <= set(SPEED_FLAGS)
            or len(layer_offload) > 1):
        raise ValueError(f"unknown configuration {name!r}: use notebook, notebook-bf16, ours or "
                         "<sdpa|varlen>[-liger][-offload][-compile][-lean][-reent][-off<N>]-<b1|b2|b4|b8>")
    batch = MICRO_BATCHES[micro]

    def switch(flag: str) -> str:
        return "on" if flag in flags else "off"

    return {"attention": attention, "liger_kernels": switch("liger"), "activation_offloading": switch("offload"),
            "compile_layers": switch("compile"), "deferred_metrics": switch("lean"),
            "gradient_checkpointing": "reentrant" if "reent" in flags else "on",
            "offload_layers": int(layer_offload[0][3:]) if layer_offload else 0,
            "batch_size": batch, "grad_accum": 8 // batch}


def ours_args(name: str, output_dir: Path, steps: int, *, smoke: bool) -> tuple[Any, Any]:
    from dataclasses import replace

    from persona_router.training.config import TrainConfig
    from persona_router.training.sft_setup import sft_config

    overrides = variant_overrides(name)
    config = TrainConfig(max_steps=steps, save_steps=10**6).with_overrides(overrides)
    config = config.resolved("cpu" if smoke else "cuda")
    if smoke:  # CPU cannot run the CUDA settings; keep everything else
        checkpointing = "on" if config.gradient_checkpointing == "off" else config.gradient_checkpointing
        config = replace(config, max_length=MAX_LENGTH, gradient_checkpointing=checkpointing,
                         batch_size=config.batch_size or 2,
                         grad_accum=config.grad_accum or 4, attention="sdpa", liger_kernels="off",
                         activation_offloading="off", offload_layers=0)
    args = sft_config(config, output_dir=output_dir, device="cpu" if smoke else "cuda")
    args.disable_tqdm = True
    return args, config
