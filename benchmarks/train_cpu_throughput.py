"""CPU training throughput: ``persona-router train``'s trainer path against a plain PEFT loop, same model/data.

One process, one persona's demo rows (student, 80 rows), the offline SmolLM2-135M base (Phi-3 layout), LoRA
r=16 on all linear layers. Every variant starts from a fresh copy of the base with a fresh adapter, runs
``--warmup`` optimizer steps untimed and then ``--steps`` timed ones, each step = batch x accumulation rows:

- ``trainer-before``: the CPU defaults this repository shipped before (TRL ``SFTTrainer``, rows packed
  without padding into one row of up to 2 x 512 tokens per micro-batch, fp32, a checkpoint every 3 steps);
- ``plain-fp32`` / ``plain-bf16``: a hand-written loop (forward with labels, backward, clip, AdamW) over the
  trainer's own batches, without and with ``torch.autocast("cpu", bfloat16)``;
- ``trainer-*``: the trainer with the changes added one at a time: padding instead of packing, bf16 autocast,
  no LoRA dropout, micro-batch 1 x accumulation 4 (packed rows of <= 512 tokens instead of 1,024: the CPU
  attention kernel computes the whole masked square), ``trainer-after-trl-loss``: the current CPU defaults
  (``TrainConfig().resolved("cpu")``, bf16 only where the CPU has it natively) with TRL's own loss, and
  ``trainer-after``: the same with the trainer's CPU answer-only loss (``training/answer_loss.py``), which is
  what ``persona-router train`` runs. Every other trainer variant runs TRL's loss, as the trainer did before.

Also records a ``torch.profiler`` breakdown (top operators by self CPU time) of one timed step of
``trainer-before`` and ``plain-fp32`` when ``--profile`` is given. Tokens are real (non-padding) tokens.
Run it on free cores (``/work/tools/cpu.sh --measure``); it records the CPU model, its bf16 instructions, the
thread count and the load average before and after.

    python benchmarks/train_cpu_throughput.py --out benchmarks/results/train_cpu_throughput.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("train_cpu_throughput")

# Variants that run the trainer's own CPU loss (training/answer_loss.py); every other trainer variant runs TRL's.
ANSWER_LOSS_VARIANTS = ("trainer-after", "trainer-after-bf16-base", "trainer-after-eager", "trainer-after-sdpa",
                        "trainer-after-compiled")
BF16_BASE_VARIANTS = ("trainer-after-bf16-base",)

# The CPU defaults before this benchmark's changes (for the "before" row; the current ones come from the code).
BEFORE = {"mixed_precision": "no", "batch_size": 2, "grad_accum": 2, "max_length": 512, "packing": True,
          "save_steps": 3, "learning_rate": 1e-3, "lora_dropout": 0.05, "prompt_free_fraction": 0.0}


def cpu_info() -> dict[str, Any]:
    from persona_router.training.cpu_precision import cpu_bf16_native, cpu_flags_summary

    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     model)
    except OSError:
        pass
    return {"cpu_model": model, "logical_cpus": os.cpu_count(), "torch_probes": cpu_flags_summary(),
            "bf16_native": cpu_bf16_native(), "platform": platform.platform()}


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def setup(overrides: dict[str, Any], steps: int, work: Path) -> tuple[Any, Any, Any]:
    from persona_router.adapters.base_model import BaseModelConfig, load_base
    from persona_router.adapters.offline_default import DEFAULT_BASE
    from persona_router.core.pack import load_pack
    from persona_router.training.config import TrainConfig
    from persona_router.training.cpu_precision import cpu_bf16_native
    from persona_router.training.formatting import FormatResult, build_examples
    from persona_router.training.jobs import plan_jobs
    from persona_router.training.trainer import build_trainer

    job = plan_jobs(load_pack("demo"), ["student"])[0]
    base = load_base(BaseModelConfig(base=DEFAULT_BASE, device="cpu"), for_training=True)
    config = TrainConfig(**{**overrides, "max_steps": steps, "epochs": None})
    config = config.resolved("cpu", bf16_supported=cpu_bf16_native())
    assert config.max_length is not None
    fmt = build_examples(job.train_records, system_prompt=job.persona.system_prompt, tokenizer=base.tokenizer,
                         max_length=config.max_length)
    trainer, clock, _ = build_trainer(base, config, fmt, FormatResult(), work)
    return trainer, clock, config


def run_trainer(name: str, overrides: dict[str, Any], args: argparse.Namespace, work: Path,
                profile: bool) -> dict[str, Any]:
    import types

    import trl
    from transformers import TrainerCallback

    trainer, clock, config = setup(overrides, args.warmup + args.steps, work)
    loss = "answer-only" if name in ANSWER_LOSS_VARIANTS else "trl"
    if name in BF16_BASE_VARIANTS:
        import torch

        # Frozen base weights stored in bf16, so autocast does not re-cast them at every matmul.
        for param in trainer.model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    if loss == "trl":
        # What the trainer ran before training/answer_loss.py: TRL's fused LM head (torch ops on CPU).
        trainer.compute_loss = types.MethodType(trl.SFTTrainer.compute_loss, trainer)
    marks: list[tuple[float, int]] = []

    class Marks(TrainerCallback):
        def on_step_end(self, a: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.append((time.perf_counter(), clock.tokens(trainer)))

    trainer.add_callback(Marks())
    prof = _profiler(profile, args.warmup)
    if prof is not None:
        class Step(TrainerCallback):
            def on_step_end(self, a: Any, state: Any, control: Any, **kwargs: Any) -> None:
                prof.step()

        trainer.add_callback(Step())
        with prof:
            trainer.train()
    else:
        trainer.train()
    (t0, n0), (t1, n1) = marks[args.warmup - 1], marks[-1]
    result = {"variant": name, "kind": "trainer", "settings": {**_settings(config), "loss": loss},
              "timed_steps": len(marks) - args.warmup,
              "tokens": n1 - n0, "seconds": round(t1 - t0, 2), "tokens_per_s": round((n1 - n0) / (t1 - t0), 1)}
    if prof is not None:
        result["profile_top_ops"] = _top_ops(prof)
    gc.collect()
    return result


def run_plain(name: str, bf16: bool, args: argparse.Namespace, work: Path, profile: bool) -> dict[str, Any]:
    import torch

    trainer, _, config = setup({**BEFORE, "mixed_precision": "no"}, args.warmup + args.steps, work)
    model = trainer.model  # the same PEFT model and LoRA init the trainer would train
    loader = trainer.get_train_dataloader()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    model.train()
    batches = iter(loader)
    accum = config.grad_accum or 1
    prof = _profiler(profile, args.warmup)
    marks: list[tuple[float, int]] = []
    tokens = 0

    def step() -> None:
        nonlocal tokens, batches
        for _ in range(accum):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append((time.perf_counter(), tokens))

    if prof is not None:
        with prof:
            for _ in range(args.warmup + args.steps):
                step()
                prof.step()
    else:
        for _ in range(args.warmup + args.steps):
            step()
    (t0, n0), (t1, n1) = marks[args.warmup - 1], marks[-1]
    result = {"variant": name, "kind": "plain", "settings": {**_settings(config), "mixed_precision":
                                                              "bf16" if bf16 else "no"},
              "timed_steps": args.steps, "tokens": n1 - n0, "seconds": round(t1 - t0, 2),
              "tokens_per_s": round((n1 - n0) / (t1 - t0), 1)}
    if prof is not None:
        result["profile_top_ops"] = _top_ops(prof)
    gc.collect()
    return result


def _settings(config: Any) -> dict[str, Any]:
    keys = ("batch_size", "grad_accum", "max_length", "packing", "mixed_precision", "save_steps", "logging_steps")
    return {k: getattr(config, k) for k in keys}


def _profiler(enabled: bool, warmup: int) -> Any:
    if not enabled:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    # Records exactly one optimizer step after the warm-up ones.
    return profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=warmup, warmup=0, active=1, repeat=1))


def _top_ops(prof: Any, count: int = 15) -> list[dict[str, Any]]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:count]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train_cpu_throughput.json"))
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per variant")
    parser.add_argument("--variants", default="trainer-before,plain-fp32,trainer-bf16,plain-bf16,"
                        "trainer-bf16-nodropout,trainer-bf16-nodropout-b1,trainer-after-trl-loss,trainer-after")
    parser.add_argument("--profile", action="store_true", help="torch.profiler of one timed step of every variant")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import torch
    from persona_router.adapters.base_model import configure_threads

    threads = configure_threads()
    report: dict[str, Any] = {"benchmark": "train_cpu_throughput", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "threads": threads, "torch": torch.__version__, **cpu_info(),
                              "load_avg_before": load_avg(), "steps": args.steps, "warmup": args.warmup,
                              "persona": "student", "results": []}
    trainer_variants = {
        "trainer-before": BEFORE,
        "trainer-padded": {**BEFORE, "packing": False},
        "trainer-bf16": {**BEFORE, "mixed_precision": "bf16"},
        "trainer-padded-bf16": {**BEFORE, "packing": False, "mixed_precision": "bf16"},
        "trainer-bf16-nodropout": {**BEFORE, "mixed_precision": "bf16", "lora_dropout": 0.0},
        "trainer-bf16-nodropout-b1": {**BEFORE, "mixed_precision": "bf16", "lora_dropout": 0.0, "batch_size": 1,
                                      "grad_accum": 4},
        "trainer-after-trl-loss": {},
        "trainer-after": {},
        "trainer-after-bf16-base": {},
        "trainer-after-eager": {"attention": "eager"},
        "trainer-after-sdpa": {"attention": "sdpa"},
        "trainer-after-compiled": {"compile_layers": "on"},
    }
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="train-cpu-") as tmp:
        for name in args.variants.split(","):
            profile = args.profile
            work = Path(tmp) / name
            started = time.perf_counter()
            if name in trainer_variants:
                row = run_trainer(name, trainer_variants[name], args, work, profile)
            elif name in ("plain-fp32", "plain-bf16"):
                row = run_plain(name, name.endswith("bf16"), args, work, profile)
            else:
                parser.error(f"unknown variant {name!r}")
            row["wall_s_incl_setup"] = round(time.perf_counter() - started, 1)
            row["load_avg"] = load_avg()
            report["results"].append(row)
            print(f"{name:22s} {row['tokens_per_s']:8.1f} tokens/s  ({row['tokens']} tokens, {row['seconds']} s)",
                  flush=True)
            report["load_avg_after"] = load_avg()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    rates = {r["variant"]: r["tokens_per_s"] for r in report["results"]}
    if "trainer-before" in rates and "trainer-after" in rates:
        report["speedup_after_vs_before"] = round(rates["trainer-after"] / rates["trainer-before"], 2)
    if "trainer-after-trl-loss" in rates and "trainer-after" in rates:
        report["speedup_answer_loss_vs_trl_loss"] = round(rates["trainer-after"] / rates["trainer-after-trl-loss"], 2)
    if "plain-bf16" in rates and "trainer-after" in rates:
        report["trainer_after_vs_plain_bf16"] = round(rates["trainer-after"] / rates["plain-bf16"], 2)
    if "plain-fp32" in rates and "trainer-before" in rates:
        report["plain_fp32_vs_trainer_before"] = round(rates["plain-fp32"] / rates["trainer-before"], 2)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
