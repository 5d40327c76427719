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
import os
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

# The data and configurations live in train_gpu_configs.py, what one child measures in train_gpu_child.py; the
# names other scripts import from here (train_multigpu.py) are re-exported.
from benchmarks.train_gpu_child import StepTimer as StepTimer  # noqa: E402
from benchmarks.train_gpu_child import _free, load_model, run_config  # noqa: E402
from benchmarks.train_gpu_configs import (  # noqa: E402
    ANSWER_RANGE,
    CONTEXT_RANGE,
    QUESTION_RANGE,
    SYSTEM_TOKENS,
    synthetic_rows,
    variant_overrides,
)
from benchmarks.train_gpu_configs import ours_dataset as ours_dataset  # noqa: E402
from benchmarks.train_gpu_report import environment, measure_ceilings, print_table, summarise  # noqa: E402

log = logging.getLogger("train_gpu")


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
