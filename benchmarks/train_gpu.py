"""QLoRA training throughput on one GPU: the original notebook's configuration against ours.

Model: a randomly initialised Phi-3-mini (``transformers.Phi3Config()`` defaults, 3.82B parameters) loaded in
4-bit NF4 with double quantisation and bf16 compute (no Phi-3 weights can reach the GPU machine; speed and
memory depend on the shape, not the values). Data: synthetic token sequences shaped like Webscale-RL rows: a
system prompt, a context of a few hundred to several thousand tokens (log-uniform), a short question and a
short answer. Both configurations train LoRA r=16, alpha=32, dropout 0.05 on all linear layers with TRL's
SFTTrainer on the same rows:

- ``notebook``: per-device batch 2 x gradient accumulation 4, max_length 1024 cut from the end (answers
  are lost when the context is long), loss on the whole sequence, padded batches, gradient checkpointing,
  paged_adamw_8bit, fp16 mixed precision.
- ``ours``: ``training/config.py``'s CUDA defaults as they stand, through ``training/sft_setup.py`` and
  ``training/cuda_kernels.py`` (the exact arguments of ``persona-router train``): contexts cut so question and
  answer survive, loss on the answer only, examples packed without padding (attention stays within each
  example), bf16, gradient checkpointing, paged_adamw_8bit, an effective batch of 8 packed rows of up to 1024
  tokens.
- the other names pin every speed setting (so their meaning does not move when the defaults do), on top of
  ours: ``<attention>[-liger][-offload][-compile][-lean][-reent]-b<micro-batch>`` with attention ``sdpa``
  (transformers builds a dense block-diagonal mask for the packed row) or ``varlen`` (per-example
  FlashAttention kernels, no mask), ``liger`` (Liger's fused RMSNorm and SwiGLU), ``offload`` (checkpointed
  activations moved to host memory), ``compile`` (``torch.compile`` of each decoder layer,
  ``training/regional_compile.py``), ``lean`` (metrics read once per log line instead of a host-device
  synchronisation per micro-batch, ``training/lean_trainer.py``), ``reent`` (reentrant gradient
  checkpointing: a forward without autograd, each layer recomputed and differentiated inside the backward),
  ``off<N>`` (with ``reent``: the first N layers' checkpointed inputs wait in host memory, ``training/offload.py``),
  and micro-batch 1, 2, 4 or 8 packed rows (accumulation 8, 4, 2 or 1: always 8 rows per optimizer step).
  ``sdpa-b4`` is the default before varlen attention, ``varlen-liger-b2`` the one before ``compile`` and
  ``lean``.

Reported per configuration: real (non-padding) tokens/s and seconds per 1,000 examples over the timed steps
(after warm-up steps), each step's wall time (the first ones include compilation where it applies), peak
allocated GPU memory over warm-up and timed steps (weights included), optionally a breakdown of two more steps
(``benchmarks/train_gpu_profile.py``: phase times of one step, kernel categories of another), and, for the
configurations named in ``--memory-breakdown``, what is live at the peak of one more step
(``benchmarks/train_gpu_memory.py``), and for compiled layers how many graphs Dynamo built in each step (none
may be built inside the timed steps). Each configuration runs in its own child process, so no memory or warm-up
carries over from the previous one. JSON is rewritten after each configuration, so a timeout keeps what
finished. The parent also measures the card's bf16 matrix-product rate and copy bandwidth, and quantises the
random model to NF4 once (children load the 4-bit folder). A configuration that would start after
``--budget-s`` is skipped.

    python benchmarks/train_gpu.py --out benchmarks/results/train_gpu_h200.json --no-profile \
        --configs notebook-bf16,varlen-liger-b2,varlen-liger-lean-b2,varlen-compile-lean-b2 \
        --memory-breakdown notebook-bf16,varlen-liger-b4
    python benchmarks/train_gpu.py --smoke --out /tmp/train_gpu_smoke.json   # CPU, tiny model: checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # Appended, not prepended: the checkout's persona_router/ folder holds only the namespace's root, and must
    # not shadow an installed (or PYTHONPATH) persona_router that has the subpackages.
    sys.path.append(str(ROOT))

from benchmarks.train_gpu_report import environment, measure_ceilings, print_table, summarise  # noqa: E402

log = logging.getLogger("train_gpu")

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


def make_model_folder(folder: Path, *, smoke: bool) -> Path:
    import torch

    from tests.support.random_model import save_random_model, tiny_phi3_config, train_tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(folder)  # supplies pad/eos ids only; the data are token ids already
    if smoke:
        config = tiny_phi3_config(len(tokenizer))
    else:
        from transformers import Phi3Config

        config = Phi3Config(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.bos_token_id)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    # Random init on the GPU takes seconds instead of minutes on the CPU (save_random_model's own device
    # argument decides: an enclosing torch.device context does not reach inside it).
    model = save_random_model(folder, config, dtype=torch.float32 if smoke else torch.bfloat16, device=device)
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("random model with %.2fB parameters saved in %.0f s", params / 1e9, time.perf_counter() - started)
    return folder


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


def quantize_folder(folder: Path) -> Path:
    """Save the NF4 (double-quant, bf16 compute) model once; children then load 2 GB instead of quantising 7.6."""
    import shutil

    target = folder.parent / "model-nf4"
    started = time.perf_counter()
    model = load_model(folder, smoke=False)
    model.save_pretrained(target)
    for item in folder.iterdir():
        if item.name.startswith("tokenizer") or item.name.endswith(".jinja") or item.name == "special_tokens_map.json":
            shutil.copy2(item, target / item.name)
    del model
    _free()
    log.info("NF4 copy saved in %.0f s", time.perf_counter() - started)
    return target


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


def write(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def run_child(args: argparse.Namespace) -> int:
    """One configuration in this (fresh) process; the result goes to ``--child-out``."""
    folder = Path(args.model_dir)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    rows = synthetic_rows(args.examples, vocab)
    try:
        result = run_config(args.child, folder, rows, steps=args.steps, warmup=args.warmup, smoke=args.smoke,
                            profile=not args.no_profile, memory=args.child in _names(args.memory_breakdown))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as data, not as a crash
        result = {"config": args.child, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-3000:]}
    write(Path(args.child_out), result)
    return 0


def _names(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def run_isolated(name: str, folder: Path, args: argparse.Namespace, timeout_s: float) -> dict[str, Any]:
    """Run one configuration in a child process: peak memory and warm-up are then per configuration, with
    nothing left over from the previous one (a shared process inflated later configs' peaks)."""
    out = folder.parent / f"result-{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--child", name,
               "--model-dir", str(folder), "--child-out", str(out), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--examples", str(args.examples)]
    if args.smoke:
        command.append("--smoke")
    if args.no_profile:
        command.append("--no-profile")
    if args.memory_breakdown:
        command += ["--memory-breakdown", args.memory_breakdown]
    try:
        done = subprocess.run(command, timeout=timeout_s, check=False, stdout=sys.stderr)
    except subprocess.TimeoutExpired:
        return {"config": name, "error": f"timed out after {timeout_s:.0f} s"}
    if not out.is_file():
        return {"config": name, "error": f"child exited with {done.returncode} and no result"}
    return dict(json.loads(out.read_text(encoding="utf-8")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--configs", default="notebook-bf16,ours,sdpa-b4",
                        help="comma-separated (default: %(default)s); see the module docstring for the names")
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per config")
    parser.add_argument("--warmup", type=int, default=3, choices=range(1, 50), metavar="N",
                        help="untimed optimizer steps first (>= 1)")
    parser.add_argument("--examples", type=int, default=800, help="synthetic rows")
    parser.add_argument("--budget-s", type=float, default=330, help="skip configs that would start after this")
    parser.add_argument("--limit-s", type=float, default=470, help="hard cap on the whole run's wall time")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, no 4-bit: only checks the script")
    parser.add_argument("--no-profile", action="store_true", help="skip the two instrumented steps per config")
    parser.add_argument("--memory-breakdown", default="",
                        help="comma-separated configs that run one more step recording what is live at its peak")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        return run_child(args)
    started = time.perf_counter()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU visible; use --smoke to check the script on CPU", file=sys.stderr)
        return 2
    payload: dict[str, Any] = {"benchmark": "train_gpu", "environment": environment(), "smoke": args.smoke,
                               "model": "tiny Phi-3 (smoke)" if args.smoke else "random Phi3Config() (Phi-3-mini "
                               "shape) in 4-bit NF4, double quant, bf16 compute",
                               "isolation": "one child process per configuration",
                               "data": {"examples": args.examples, "system_tokens": SYSTEM_TOKENS,
                                        "context_tokens_loguniform": CONTEXT_RANGE,
                                        "question_tokens": QUESTION_RANGE, "answer_tokens": ANSWER_RANGE},
                               "results": []}
    names = _names(args.configs)
    for name in names:
        if not name.startswith("notebook"):
            variant_overrides(name)  # unknown names fail here, before any model is built
    with tempfile.TemporaryDirectory(prefix="train-gpu-model-") as tmp:
        folder = make_model_folder(Path(tmp) / "model", smoke=args.smoke)
        if not args.smoke:
            payload["ceilings"] = measure_ceilings()
            log.info("ceilings: %s", payload["ceilings"])
            try:
                folder = quantize_folder(folder)
            except (OSError, RuntimeError, ValueError) as exc:  # children then quantise on load, as before
                log.warning("could not save the NF4 copy (%s); each child quantises on load", exc)
        for name in names:
            elapsed = time.perf_counter() - started
            if elapsed > args.budget_s:
                payload["results"].append({"config": name, "skipped": "time budget spent"})
                continue
            log.info("running %s", name)
            result = run_isolated(name, folder, args, timeout_s=max(30.0, args.limit_s - elapsed))
            payload["results"].append(result)
            if name == "notebook" and "error" in result and "notebook-bf16" not in names:
                # fp16 autocast over a bf16-compute 4-bit model fails on newer stacks (GradScaler cannot unscale
                # the bf16 LoRA gradients); bf16 is the closest configuration that runs, and the JSON says so.
                names.append("notebook-bf16")
            payload["summary"] = summarise(payload["results"])
            payload["wall_s"] = round(time.perf_counter() - started, 1)
            write(args.out, payload)
            log.info("%s", json.dumps({k: v for k, v in result.items() if k not in ("profile", "settings")})[:600])
    print_table(payload)
    print(json.dumps({"summary": payload.get("summary"), "wall_s": payload.get("wall_s")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
