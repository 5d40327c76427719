"""Reporting for ``benchmarks/train_gpu.py``: environment, the card's ceilings, the summary and a short table."""

from __future__ import annotations

import gc
import os
import platform
import sys
from typing import Any


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "host_cpus": os.cpu_count()}
    for module in ("transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "flash_attn"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = "not installed"
    env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each configuration against the notebook, and the fastest one at or under the notebook's peak memory."""
    done = {r["config"]: r for r in results if "tokens_per_s" in r}
    baseline = "notebook" if "notebook" in done else "notebook-bf16"
    if baseline not in done:
        return {}
    nb = done[baseline]
    table = {}
    for name, r in done.items():
        row = {"tokens_ratio": round(r["tokens_per_s"] / nb["tokens_per_s"], 2),
               "examples_ratio": round(nb["s_per_1000_examples"] / r["s_per_1000_examples"], 2),
               "answer_token_ratio": round(r["answer_tokens_in_window_per_s"]
                                           / max(nb["answer_tokens_in_window_per_s"], 1e-9), 2)}
        if nb["peak_gpu_memory_gib"] and r["peak_gpu_memory_gib"]:
            row["memory_ratio"] = round(r["peak_gpu_memory_gib"] / nb["peak_gpu_memory_gib"], 3)
        table[name] = row
    summary: dict[str, Any] = {"baseline": baseline, "vs_baseline": table}
    if "ours" in table:  # the headline numbers, as before
        summary.update({"throughput_ratio_tokens": table["ours"]["tokens_ratio"],
                        "throughput_ratio_examples": table["ours"]["examples_ratio"],
                        "answer_token_ratio": table["ours"]["answer_token_ratio"]})
        if "memory_ratio" in table["ours"]:
            summary["memory_ratio"] = table["ours"]["memory_ratio"]
    fitting = [n for n, row in table.items() if not n.startswith("notebook") and row.get("memory_ratio", 9) <= 1.0]
    if fitting:
        best = max(fitting, key=lambda n: done[n]["tokens_per_s"])
        summary["fastest_within_notebook_memory"] = {"config": best, **table[best]}
    return summary


def measure_ceilings() -> dict[str, Any]:
    """The card's bf16 matrix-product rate and device-to-device copy bandwidth, on random data, in this run."""
    import torch

    def timed(fn: Any, repeats: int = 10) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end)) / 1000 / repeats

    n = 8192
    mats = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    matmul_s = timed(lambda: mats[0] @ mats[1])
    mats.clear()
    bufs = [torch.randn(2**29, device="cuda", dtype=torch.float32)]  # 2 GiB
    bufs.append(torch.empty_like(bufs[0]))
    copy_s = timed(lambda: bufs[1].copy_(bufs[0]))
    moved = 2 * bufs[0].numel() * 4
    bufs.clear()
    gc.collect()
    torch.cuda.empty_cache()
    return {"bf16_matmul_tflops": round(2 * n**3 / matmul_s / 1e12, 1),
            "copy_tb_per_s_read_plus_write": round(moved / copy_s / 1e12, 2),
            "method": "8192^3 bf16 product and a 2 GiB float32 copy, random data, mean of 10 after 3 warm-ups"}


def print_table(payload: dict[str, Any]) -> None:
    """A short table last, for the end of a log."""
    print(f"{'config':32} {'tok/s':>8} {'peak GiB':>8} {'proj TF/s':>9} {'busy':>5}  phase seconds", file=sys.stderr)
    for r in payload["results"]:
        if "tokens_per_s" not in r:
            print(f"{r['config']:32} {r.get('error') or r.get('skipped')}"[:200], file=sys.stderr)
            continue
        prof = r.get("profile", {})
        busy = prof.get("kernel_step", {}).get("gpu_busy_fraction")
        phases = prof.get("phase_step", {}).get("seconds", {})
        short = " ".join(f"{k.split(' ')[0][:9]}={v:.3f}" for k, v in phases.items())
        print(f"{r['config']:32} {r['tokens_per_s']:8.0f} {r['peak_gpu_memory_gib'] or 0:8.3f} "
              f"{r['projection_tflops_per_s']:9.1f} {busy if busy is not None else '-':>5}  {short}", file=sys.stderr)
