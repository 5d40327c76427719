"""QLoRA training of one persona on 1, 2 (and 4) GPUs with data parallelism: tokens/s, memory, scaling.

The same random Phi-3-mini-shaped 4-bit model, synthetic rows and training settings as
``benchmarks/train_gpu.py``'s ``ours`` (the CUDA defaults), trained through the code path of
``persona-router train --gpus N``: ``torch.distributed.run`` starts one process per GPU, each rank loads the NF4
base on its own GPU, ``TrainConfig.resolved(world_size=N)`` splits the default accumulation so the global batch
stays 8 packed rows, and the Trainer wraps the LoRA model in DDP (gradients all-reduced over NCCL).

Reported per GPU count: global real tokens/s over the timed steps (rank 0's step clock, tokens summed over
ranks), peak allocated memory of every rank, and the scaling efficiency tokens/s(N) / (N x tokens/s(1)).
NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``). Needs a machine with several GPUs:

    python benchmarks/train_multigpu.py --out benchmarks/results/train_multigpu_h200x2.json --gpus 1,2
    python benchmarks/train_multigpu.py --smoke --gpus 1,2 --out /tmp/train_multigpu_smoke.json  # CPU, gloo
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended: must not shadow the installed persona_router (see train_gpu.py)

from benchmarks.train_gpu import (  # noqa: E402
    StepTimer,
    load_model,
    make_model_folder,
    ours_dataset,
    quantize_folder,
    synthetic_rows,
)
from benchmarks.train_gpu_report import environment  # noqa: E402

log = logging.getLogger("train_multigpu")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run_rank(args: argparse.Namespace) -> int:
    """One rank of one GPU count (started by torch.distributed.run)."""
    import datasets
    import torch
    import torch.distributed as dist
    import trl
    from persona_router.training.config import TrainConfig
    from persona_router.training.cuda_kernels import prepare_model
    from persona_router.training.distributed import init_process_group, world
    from persona_router.training.sft_setup import lora_config, sft_config
    from transformers import AutoTokenizer

    device = "cpu" if args.smoke else "cuda"
    init_process_group(device)
    current = world()
    folder = Path(args.model_dir)
    rows = synthetic_rows(args.examples, json.loads((folder / "config.json").read_text())["vocab_size"])
    total = args.warmup + args.steps
    config = TrainConfig(max_steps=total, save_steps=10**6).resolved(device, world_size=current.size)
    if args.smoke:
        from dataclasses import replace

        config = replace(config, max_length=1024, batch_size=2, grad_accum=max(1, 4 // current.size))
    data = ours_dataset(rows, config.max_length or 1024)
    with tempfile.TemporaryDirectory(prefix=f"multigpu-rank{current.rank}-") as work:
        sft_args = sft_config(config, output_dir=Path(work), device=device)
        sft_args.disable_tqdm = True
        model = load_model(folder, smoke=args.smoke)
        model.config.use_cache = False
        prepare_model(model, config, device)
        timer = StepTimer(timed_until=total)
        datasets.disable_progress_bars()
        trainer = trl.SFTTrainer(model=model, args=sft_args, train_dataset=datasets.Dataset.from_list(data),
                                 processing_class=AutoTokenizer.from_pretrained(folder),
                                 peft_config=lora_config(config), callbacks=[timer.callback()])
        timer.trainer = trainer
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    (t0, k0), (t1, k1) = timer.marks[args.warmup - 1], timer.marks[total - 1]
    peaks: list[Any] = [None] * current.size
    dist.all_gather_object(peaks, timer.peak_allocated)
    if current.is_main:
        result = {"gpus": current.size, "per_rank_micro_batch": config.batch_size, "per_rank_accumulation":
                  config.grad_accum, "global_batch_rows": (config.batch_size or 1) * (config.grad_accum or 1)
                  * current.size, "steps_timed": args.steps, "warmup_steps": args.warmup,
                  "tokens_per_s": round((k1 - k0) / (t1 - t0), 1),  # TRL sums the tokens of every rank
                  "peak_gpu_memory_gib_per_rank": [None if p is None else round(p / 2**30, 3) for p in peaks],
                  "attention": config.attention, "liger_kernels": config.liger_kernels}
        Path(args.child_out).write_text(json.dumps(result) + "\n", encoding="utf-8")
    dist.destroy_process_group()
    return 0


def launch(count: int, folder: Path, args: argparse.Namespace, timeout_s: float) -> dict[str, Any]:
    out = folder.parent / f"result-{count}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}",
               str(Path(__file__).resolve()), "--rank-worker", "--model-dir", str(folder), "--child-out", str(out),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--examples", str(args.examples),
               "--out", str(out)]
    if args.smoke:
        command.append("--smoke")
    env = {**os.environ, **NO_MULTICAST, "PERSONA_ROUTER_THREADS": "1" if args.smoke else "4"}
    try:
        done = subprocess.run(command, env=env, timeout=timeout_s, check=False, stdout=sys.stderr)
    except subprocess.TimeoutExpired:
        return {"gpus": count, "error": f"timed out after {timeout_s:.0f} s"}
    if not out.is_file():
        return {"gpus": count, "error": f"ranks exited with {done.returncode} and no result"}
    return dict(json.loads(out.read_text(encoding="utf-8")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--gpus", default="1,2", help="comma-separated GPU counts (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per GPU count")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (>= 1)")
    parser.add_argument("--examples", type=int, default=800, help="synthetic rows")
    parser.add_argument("--limit-s", type=float, default=540, help="cap on the whole run's wall time")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, gloo: only checks the script")
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.rank_worker:
        return run_rank(args)
    import torch

    counts = [int(c) for c in args.gpus.split(",") if c.strip()]
    available = torch.cuda.device_count()
    if not args.smoke and (not torch.cuda.is_available() or max(counts) > available):
        print(f"needs {max(counts)} CUDA GPUs, {available} visible; use --smoke to check the script on CPU",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    payload: dict[str, Any] = {"benchmark": "train_multigpu", "environment": environment(), "smoke": args.smoke,
                               "gpus_visible": available, "results": []}
    with tempfile.TemporaryDirectory(prefix="train-multigpu-model-") as tmp:
        folder = make_model_folder(Path(tmp) / "model", smoke=args.smoke)
        if not args.smoke:
            folder = quantize_folder(folder)
        for count in counts:
            elapsed = time.perf_counter() - started
            payload["results"].append(launch(count, folder, args, timeout_s=max(60.0, args.limit_s - elapsed)))
            done = {r["gpus"]: r for r in payload["results"] if "tokens_per_s" in r}
            if 1 in done:
                payload["scaling_efficiency"] = {
                    str(n): round(r["tokens_per_s"] / (n * done[1]["tokens_per_s"]), 3) for n, r in done.items()}
            payload["wall_s"] = round(time.perf_counter() - started, 1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
            log.info("%s", json.dumps(payload["results"][-1]))
    print(json.dumps({"results": payload["results"], "scaling_efficiency": payload.get("scaling_efficiency")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
