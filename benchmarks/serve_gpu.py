"""Serving benchmark on one GPU: vanilla PEFT ``generate(adapter_names=...)`` against ``BatchedEngine``.

Model: a randomly initialised Phi-3-mini-shaped model (``Phi3Config()`` defaults, 3.82B parameters),
saved once to local disk; speed and memory depend on the shape, not the values. Workload: random
128-token prompts, 64 new tokens, greedy, no early stop; random r=16 all-linear LoRA adapters.
For each precision (NF4 and bf16): batch-1 ms/token and time to first token, throughput at 8/32/64
concurrent streams over 1 and over 4 adapters, adapter load time, peak GPU memory; for NF4 also the
engine's ``kernel`` mode (4-bit matmuls) against its default ``dequantize`` mode.

    python3 benchmarks/serve_gpu.py --out benchmarks/results/serve_gpu.json     # on the GPU machine
    python benchmarks/serve_gpu.py --smoke --out /tmp/serve_smoke.json         # CPU check of this script

The JSON is rewritten after every phase, so a run cut short still leaves its numbers. Exit status 1 when
a self-check fails (engine vs PEFT logits, or a stream that did not deliver all its tokens).

The random model, adapters and device helpers are in ``serve_gpu_setup.py``, the timed runs of either system in
``serve_gpu_runs.py``, one precision's phases in ``serve_gpu_precision.py``, the self-check in
``serve_gpu_checks.py``, the table and floors in ``serve_gpu_report.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after the installed package: the repo root holds a bare persona_router folder

from benchmarks.serve_gpu_checks import self_check_failures  # noqa: E402
from benchmarks.serve_gpu_precision import run_precision  # noqa: E402
from benchmarks.serve_gpu_report import add_floors, table  # noqa: E402
from benchmarks.serve_gpu_setup import (  # noqa: E402
    build_model,
    copy_bandwidth,
    environment,
    free_memory,
    load_model,
    make_prompts,
    one_row_bytes,
    timed,
    weight_bytes,
    write_adapters,
)

log = logging.getLogger("serve_gpu")
# What the other benchmarks import from this script (serve_multigpu, engine_numerics_gpu, profile_decode_gpu,
# kernels_gpu): re-exported so they keep one import for the one-GPU workload.
__all__ = ["build_model", "copy_bandwidth", "environment", "free_memory", "load_model", "make_prompts",
           "one_row_bytes", "timed", "weight_bytes", "write_adapters"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results path")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/persona-router-bench/phi3-mini-random"))
    parser.add_argument("--precisions", default="nf4,bf16")
    parser.add_argument("--streams", default="8,32,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--engine-only", action="store_true",
                        help="skip vanilla PEFT's throughput suite and the engine's bitsandbytes-kernel mode (the "
                             "self-check still compares with vanilla PEFT's logits)")
    parser.add_argument("--engine-config", default="",
                        help="EngineConfig fields for the engine under test, e.g. nf4_mode=fused,kernels=on "
                             "(default: the engine's own defaults)")
    parser.add_argument("--variants", default="",
                        help="';'-separated further engine configurations measured after the first one in the same "
                             "process on the same model (self-check, streams, memory), e.g. 'kernels=off;"
                             "nf4:gemv=triton' (a 'precision:' prefix limits one to that precision)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, not speed")
    return parser.parse_args()


def main() -> int:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args()
    if args.smoke:
        args.model_dir = args.model_dir.with_name(args.model_dir.name + "-smoke")
        args.prompt_len, args.new_tokens = 16, 8
    streams = [int(s) for s in args.streams.split(",")] if not args.smoke else [2, 4]
    precisions = args.precisions.split(",") if not args.smoke else ["fp32"]
    if not args.smoke and not torch.cuda.is_available():
        log.error("no CUDA device; use --smoke for a CPU check of the script")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True  # what a server would run with; fp32 is not used on GPU here
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "environment": environment(),
        "workload": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "adapters": args.adapters,
                     "rank": 16, "greedy": True, "model": "Phi3Config() defaults, random weights"},
        "stream_keys": [f"{s}x{k}" for s in streams for k in (1, args.adapters)],
        "results": {},
    }

    def save() -> None:
        from persona_router.core.atomic import atomic_write_json

        atomic_write_json(args.out, report)

    started = time.perf_counter()
    if torch.cuda.is_available():
        report["bandwidth"] = copy_bandwidth()
    report["model_build_s"] = build_model(args.model_dir, args.smoke)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, for writing the adapters
        shape_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_dir))
    report["parameters"] = sum(p.numel() for p in shape_model.parameters())
    adapters = write_adapters(shape_model, args.model_dir.parent / f"{args.model_dir.name}-adapters",
                              args.adapters, 16)
    del shape_model
    save()
    for precision in precisions:
        run_precision(precision, args, adapters, streams, report, save)
        free_memory()  # this precision's model before the next one loads
    report["total_s"] = time.perf_counter() - started
    add_floors(report)
    failures = self_check_failures(report)
    report["self_check_failures"] = failures
    save()
    print(table(report))
    if failures:
        print("SELF-CHECK FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
