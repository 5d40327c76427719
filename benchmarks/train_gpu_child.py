"""What one child process of ``benchmarks/train_gpu.py`` measures: the model load, one configuration's training
run (``run_config``) with its step timer, and the small helpers behind its result. Split off so the entry point
stays short; the child is still started as ``benchmarks/train_gpu.py --child NAME``."""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.train_gpu_configs import (
    MAX_LENGTH,
    NOTEBOOK_LORA,
    notebook_args,
    notebook_dataset,
    ours_args,
    ours_dataset,
)


def load_model(folder: Path, *, smoke: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if smoke:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if "quantization_config" in json.loads((folder / "config.json").read_text(encoding="utf-8")):
        # Quantised once by the parent (quantize_folder): the same NF4 weights, without quantising per child.
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                    device_map={"": torch.cuda.current_device()})
    from persona_router.adapters.base_model import nf4_config

    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4_config(double_quant=True),
                                                dtype=torch.bfloat16, device_map={"": torch.cuda.current_device()})



class StepTimer:
    """Wall time and real-token count at the end of every optimizer step; peak memory over warm-up and timed
    steps (the headline: compilation and first-step allocations included), and over the timed steps alone."""

    def __init__(self, timed_until: int, warmup: int) -> None:
        self.trainer: Any = None
        self.marks: list[tuple[float, int]] = []
        self.timed_until = timed_until
        self.warmup = warmup
        self.peak_allocated: int | None = None
        self.peak_reserved: int | None = None
        self.warmup_peak: tuple[int | None, int | None] = (None, None)
        self.timed_peak_allocated: int | None = None
        self.graphs: list[int] = []  # Dynamo graphs built so far, at the end of each step (compiled layers)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                _sync()
                tokens = int(getattr(timer.trainer, "_total_train_tokens", 0) or state.num_input_tokens_seen)
                timer.marks.append((time.perf_counter(), tokens))
                timer.graphs.append(_graphs_built())
                if len(timer.marks) == timer.warmup:
                    timer.warmup_peak = _peak_memory()
                    _reset_peak_memory()
                if len(timer.marks) == timer.timed_until:
                    timed = _peak_memory()
                    timer.timed_peak_allocated = timed[0]
                    timer.peak_allocated, timer.peak_reserved = (_max(timer.warmup_peak[0], timed[0]),
                                                                 _max(timer.warmup_peak[1], timed[1]))

        return _Callback()


def run_config(name: str, folder: Path, rows: list[dict[str, list[int]]], *, steps: int, warmup: int,
               smoke: bool, profile: bool, memory: bool = False) -> dict[str, Any]:
    import datasets
    import torch
    import trl
    from persona_router.training.config import TrainConfig
    from persona_router.training.cuda_kernels import prepare_model
    from persona_router.training.lean_trainer import trainer_class
    from persona_router.training.sft_setup import lora_config

    from benchmarks.train_gpu_memory import MemoryRecorder
    from benchmarks.train_gpu_profile import StepProfiler

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix=f"train-gpu-{name}-"))
    memory = memory and torch.cuda.is_available()
    # After the timed ones: a phase-timed and a torch.profiler step, then a memory-recorded one.
    extra = (2 if profile else 0) + (1 if memory else 0)
    total = warmup + steps + extra
    model = load_model(folder, smoke=smoke)
    if name in ("notebook", "notebook-bf16"):
        args, config = notebook_args(work, total, smoke=smoke, bf16=name == "notebook-bf16"), None
        data = notebook_dataset(rows)
        applied: dict[str, str] = {}
    else:
        args, config = ours_args(name, work, total, smoke=smoke)
        data = ours_dataset(rows, config.max_length)
        model.config.use_cache = False
        applied = prepare_model(model, config, "cpu" if smoke else "cuda")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    timer = StepTimer(timed_until=warmup + steps, warmup=warmup)
    profiler = StepProfiler(phase_step=warmup + steps, kernel_step=warmup + steps + 1) if profile else None
    recorder = MemoryRecorder(step=total - 1) if memory else None
    callbacks = ([timer.callback()] + ([profiler.callback()] if profiler else [])
                 + ([recorder.callback()] if recorder else []))
    trainer_cls = trl.SFTTrainer if config is None else trainer_class(trl, config)
    trainer = trainer_cls(model=model, args=args, train_dataset=datasets.Dataset.from_list(data),
                          processing_class=tokenizer, peft_config=lora_config(config or TrainConfig(**NOTEBOOK_LORA)),
                          callbacks=callbacks)
    timer.trainer = trainer
    if recorder:
        recorder.trainer = trainer
    if profiler:
        profiler.install(trainer)
    prepared: Any = trainer.train_dataset
    real_tokens = sum(min(len(d["input_ids"]), MAX_LENGTH) for d in data)
    examples_per_row = len(data) / len(prepared)
    answers_kept = _answers_kept(name, rows)
    answer_tokens = _answer_tokens_in_window(name, rows)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    timed = warmup + steps
    (t0, k0), (t1, k1) = timer.marks[warmup - 1], timer.marks[timed - 1]
    rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    examples_per_s = steps * rows_per_step * examples_per_row / (t1 - t0)
    tokens_per_s = (k1 - k0) / (t1 - t0)
    result = {
        "config": name, "steps_timed": steps, "warmup_steps": warmup,
        "tokens_per_s": round(tokens_per_s, 1),
        "s_per_1000_examples": round(1000 / examples_per_s, 2),
        "peak_gpu_memory_gib": _gib(timer.peak_allocated),
        "peak_gpu_reserved_gib": _gib(timer.peak_reserved),
        "peak_gpu_memory_timed_steps_gib": _gib(timer.timed_peak_allocated),
        "mean_real_tokens_per_example": round(real_tokens / len(data), 1),
        "examples_per_row": round(examples_per_row, 3),
        "answers_intact_fraction": answers_kept,
        # Tokens of the answer that fall inside the training window, per second: the notebook spends part of its
        # compute on examples whose answer was cut off, which teaches nothing about answering.
        "answer_tokens_in_window_per_s": round(examples_per_s * answer_tokens, 1),
        # Frozen projections only: forward, recomputation and input-gradient backward, 2 FLOP per weight each.
        "projection_tflops_per_s": round(tokens_per_s * 6 * projection_params(model) / 1e12, 1),
        "train_wall_s": round(wall, 1),
        "step_seconds": [round(end - begin, 3)
                         for (begin, _), (end, _) in zip([(started, 0), *timer.marks], timer.marks, strict=False)],
        "trainer_class": type(trainer).__name__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "speed_settings": applied,
        "settings": _settings(args),
    }
    if config is not None:
        result["train_config"] = {k: v for k, v in config.to_json().items()
                                  if k in ("batch_size", "grad_accum", "max_length", "attention", "liger_kernels",
                                           "activation_offloading", "offload_layers", "compile_layers",
                                           "deferred_metrics", "gradient_checkpointing", "optim", "packing")}
    # Every configuration must train: a LoRA that received no gradient would log a zero norm here.
    logged = [entry for entry in trainer.state.log_history if "loss" in entry and "grad_norm" in entry]
    result["loss_per_step"] = [round(float(entry["loss"]), 4) for entry in logged]
    result["grad_norm_per_step"] = [round(float(entry["grad_norm"]), 4) for entry in logged]
    if profiler:
        result["profile"] = profiler.result()
    if recorder:
        result["memory_breakdown"] = recorder.result
    if config is not None and config.compile_layers == "on":
        result["compile"] = dynamo_counters()
        built = [after - before for before, after in zip([0, *timer.graphs], timer.graphs, strict=False)]
        result["compile"]["graphs_built_per_step"] = built
        result["compile"]["graphs_built_in_timed_steps"] = sum(built[warmup:timed])
    del trainer, model
    _free()
    return result


def dynamo_counters() -> dict[str, Any]:
    """Graphs Dynamo built, graph breaks and recompilations: whether the compiled layers stayed compiled."""
    from torch._dynamo.utils import counters

    breaks = counters.get("graph_break", {})
    return {"stats": {k: int(v) for k, v in counters.get("stats", {}).items()},
            "graph_breaks": int(sum(breaks.values())),
            "graph_break_reasons": [str(reason)[:300]
                                    for reason, _ in sorted(breaks.items(), key=lambda kv: -kv[1])[:5]],
            "recompiles": {str(k)[:200]: int(v) for k, v in list(counters.get("recompiles", {}).items())[:5]}}


def _graphs_built() -> int:
    if "torch._dynamo" not in sys.modules:  # nothing compiled in this process
        return 0
    from torch._dynamo.utils import counters

    return int(counters.get("stats", {}).get("unique_graphs", 0))


def projection_params(model: Any) -> int:
    """Weights of the decoder layers' linear projections (what the 4-bit base multiplies by), from the config."""
    c = model.config
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    qkv = c.hidden_size * head * (c.num_attention_heads + 2 * c.num_key_value_heads)
    per_layer = qkv + head * c.num_attention_heads * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return int(per_layer * c.num_hidden_layers)


def _peak_memory() -> tuple[int | None, int | None]:
    import torch

    if not torch.cuda.is_available():
        return None, None
    return int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _max(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else max(a, b)


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**30, 3)


def _free() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _answers_kept(name: str, rows: list[dict[str, list[int]]]) -> float:
    if not name.startswith("notebook"):
        return 1.0
    whole = sum(1 for r in rows if len(r["system"]) + len(r["context"]) + len(r["question"]) + len(r["answer"])
                <= MAX_LENGTH)
    return round(whole / len(rows), 3)


def _answer_tokens_in_window(name: str, rows: list[dict[str, list[int]]]) -> float:
    kept = 0
    for r in rows:
        if name.startswith("notebook"):
            start = len(r["system"]) + len(r["context"]) + len(r["question"])
            kept += max(0, min(len(r["answer"]), MAX_LENGTH - start))
        else:
            kept += len(r["answer"])
    return kept / len(rows)


def _settings(args: Any) -> dict[str, Any]:
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing", "padding_free",
            "gradient_checkpointing", "optim", "fp16", "bf16", "completion_only_loss", "learning_rate")
    return {k: (str(getattr(args, k)) if k == "optim" else getattr(args, k, None)) for k in keys}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()

