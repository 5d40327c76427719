"""Where one engine step's GPU time goes: decode at batch 1 and 64, and a 128-token prefill.

Model: Phi-3-mini's shape with random weights (the folder ``serve_gpu.py`` builds), 4 random r=16 adapters.
For each NF4 mode of the engine and each case, this measures the step three ways: the CUDA-graph replay
(what the server runs), the eager step, and a torch-profiler trace of the eager step whose kernels are
attributed to the engine's parts by ``record_function`` ranges wrapped around them (base weight products,
LoRA, LoRA masks, attention with KV writes, pointwise norm/rotary/activation, LM head, the rest). It also
times greedy token choice with its device-to-host copy, and measures copy bandwidth in the same process,
so every time can be set against the floor for the bytes it must read.

    python3 benchmarks/profile_decode_gpu.py --out /tmp/profile.json      # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after the installed package: the repo root holds a bare persona_router folder

log = logging.getLogger("profile_decode_gpu")
PARTS = ("linear", "lora", "lora_masks", "attention", "pointwise", "lm_head")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/persona-router-bench/phi3-mini-random"))
    parser.add_argument("--modes", default="dequantize:off,kernel:off,fused:auto",
                        help="comma-separated nf4_mode:kernels[:gemv] (EngineConfig fields; gemv defaults to the "
                             "engine's)")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--position", type=int, default=160, help="decode position of every row")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--markdown", type=Path, help="also write the breakdown as Markdown here")
    return parser.parse_args()


def instrument(runner: Any) -> None:
    """Wrap the runner's parts in profiler ranges (instance attributes shadow the class methods)."""
    from torch.profiler import record_function

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with record_function(name):
                return fn(*args, **kwargs)
        return wrapped

    runner._linear = wrap("linear", runner._linear)
    runner._decode_attention = wrap("attention", runner._decode_attention)
    runner._decode_attention_kernel = wrap("attention", runner._decode_attention_kernel)
    runner._prefill_attention = wrap("attention", runner._prefill_attention)
    runner._logits = wrap("lm_head", runner._logits)
    runner.bank.apply = wrap("lora", runner.bank.apply)
    runner.bank.batch = wrap("lora_masks", runner.bank.batch)
    pw = runner.pw
    pw.norm, pw.rotate, pw.act_mul = (wrap("pointwise", f) for f in (pw.norm, pw.rotate, pw.act_mul))


def breakdown(fn: Callable[[], Any]) -> dict[str, Any]:
    """Device milliseconds per engine part for one call of ``fn`` (eager), plus the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    parts = dict.fromkeys(PARTS, 0.0)
    for event in events:
        if event.name in parts:
            parts[event.name] += _device_us(event) / 1e3
    kernels: dict[str, float] = {}
    counts: dict[str, int] = {}
    dequant_ms = 0.0
    for avg in prof.key_averages():
        us = getattr(avg, "self_device_time_total", None) or getattr(avg, "self_cuda_time_total", 0.0)
        # record_function ranges also show up as device events spanning their kernels and gaps: not kernels.
        if us and str(getattr(avg, "device_type", "")).endswith("CUDA") and avg.key not in PARTS:
            kernels[avg.key] = us / 1e3
            counts[avg.key] = int(avg.count)
            if "dequant" in avg.key.lower():
                dequant_ms += us / 1e3
    total = sum(kernels.values())
    base_ms = parts["linear"] - parts["lora"]  # the LoRA range sits inside the linear range
    result = {
        "kernel_total_ms": total,
        "parts_ms": {"base_weights": base_ms - dequant_ms, "dequantize": dequant_ms, "lora": parts["lora"],
                     "lora_masks": parts["lora_masks"], "attention": parts["attention"],
                     "pointwise": parts["pointwise"], "lm_head": parts["lm_head"],
                     "other": total - sum(parts[p] for p in PARTS if p != "lora")},
        "kernel_count": sum(int(a.count) for a in prof.key_averages()
                            if str(getattr(a, "device_type", "")).endswith("CUDA") and a.key not in PARTS),
        "top_kernels_ms": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:15]),
        "top_kernels": [{"name": name[:120], "ms": ms, "count": counts[name]}
                        for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:30]],
        "by_kernel_name_ms": by_name(kernels, counts),
    }
    return result


# Kernel families by name: what the profiler's ranges miss (Triton kernels launched outside PyTorch's operator
# dispatch are not attributed to the range that launched them). First match wins.
FAMILIES = (("lora_triton", ("lora_shrink", "lora_expand", "lora_dense")), ("nf4_triton", ("nf4_gemv", "nf4_dot")),
            ("attention_triton", ("decode_attention",)), ("bnb_gemv", ("kgemm_4bit", "gemv_4bit")),
            ("attention_sdpa", ("fmha", "flash", "attention", "softmax")),
            ("gemm_cublas", ("nvjet", "gemm", "gemv", "cutlass", "sm90")),
            ("compiled_pointwise", ("triton_",)), ("copy_index", ("index", "copy", "scatter", "gather", "cat")),
            ("reduce", ("reduce", "argmax", "max")))


def by_name(kernels: dict[str, float], counts: dict[str, int]) -> dict[str, dict[str, float]]:
    """Device ms and launch count per kernel family (``FAMILIES``; the rest under ``elementwise_other``)."""
    out: dict[str, dict[str, float]] = {}
    for name, ms in kernels.items():
        low = name.lower()
        family = next((f for f, keys in FAMILIES if any(k in low for k in keys)), "elementwise_other")
        entry = out.setdefault(family, {"ms": 0.0, "count": 0})
        entry["ms"] += ms
        entry["count"] += counts[name]
    return out


def _device_us(event: Any) -> float:
    """Kernel microseconds launched inside ``event`` and its children, without the range's own device span."""
    own = sum(float(k.duration) for k in getattr(event, "kernels", []) if getattr(k, "name", "") not in PARTS)
    return own + sum(_device_us(child) for child in event.cpu_children)


def profile_mode(model: Any, tokenizer: Any, mode: str, adapters: list[Path], args: argparse.Namespace,
                 bandwidth: float) -> dict[str, Any]:
    import torch
    from persona_router.adapters.engine import BatchedEngine, EngineConfig
    from persona_router.adapters.engine.lora_bank import slot_bucket
    from persona_router.adapters.engine.sampling import choose_tokens

    from benchmarks.serve_gpu import one_row_bytes, timed, weight_bytes

    batches = [int(b) for b in args.batches.split(",")]
    nf4_mode, _, rest = mode.partition(":")
    kernels, _, gemv = rest.partition(":")
    config = EngineConfig(max_batch=max(batches), max_len=256, max_adapters=8, max_rank=16, stop_token_ids=(),
                          nf4_mode=nf4_mode, kernels=kernels or "auto", **({"gemv": gemv} if gemv else {}))
    engine = BatchedEngine(model, tokenizer, config)
    names = [f"a{i}" for i in range(len(adapters))]
    for name, folder in zip(names, adapters, strict=True):
        engine.add_adapter(name, folder)
    slots = [engine.bank.slot_of(n) for n in names]
    runner = engine.runner
    kv_cache_gib = runner.kv_bytes() / 2**30
    wbytes = weight_bytes(runner)
    row_bytes = one_row_bytes(runner)
    result: dict[str, Any] = {"nf4_mode": engine.nf4_mode, "kernels": runner.kernels, "gemv": config.gemv,
                              "weight_bytes": wbytes, "kv_cache_gib": kv_cache_gib,
                              "weight_floor_ms": wbytes / bandwidth * 1e3, "one_row_weight_bytes": row_bytes,
                              "one_row_floor_ms": row_bytes / bandwidth * 1e3, "decode": {}}
    gen = torch.Generator().manual_seed(3)
    for batch in batches:
        rows_slots = [slots[i % len(slots)] for i in range(batch)]
        tokens = torch.randint(10, 30000, (batch,), generator=gen)
        inputs = torch.stack([tokens, torch.full((batch,), args.position), torch.tensor(rows_slots)], dim=1)
        runner.step_inputs[:batch].copy_(inputs)
        kv_len, m = runner.kv_len_for(args.position), slot_bucket(max(rows_slots), engine.bank.capacity)
        case: dict[str, Any] = {"kv_len": kv_len, "slot_bucket": m}
        if engine.graphs is not None:
            case["graph_ms"] = timed(partial(engine.graphs, batch, kv_len, m))
        case["eager_ms"] = timed(partial(runner.decode, batch, kv_len, m), repeats=10)
        logits = runner.decode(batch, kv_len, m)
        samplers: list[Any] = [None] * batch
        case["greedy_choice_ms"] = timed(lambda lg=logits, s=samplers: choose_tokens(lg, s))
        # KV bytes a step reads as the code stands (every row up to kv_len), and what live lengths need.
        per_pos = 2 * len(runner.w.layers) * runner.w.num_kv_heads * runner.w.head_dim * 2
        case["kv_read_bytes"] = batch * kv_len * per_pos
        case["kv_live_bytes"] = batch * (args.position + 1) * per_pos
        case["floor_ms"] = (wbytes + case["kv_live_bytes"]) / bandwidth * 1e3
        instrumented_decode = _instrumented(runner)
        try:
            case["profile"] = breakdown(partial(instrumented_decode, batch, kv_len, m))
        except Exception as exc:  # a profiler failure keeps the timings already taken
            log.exception("profile of %s batch %d failed", mode, batch)
            case["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
        result["decode"][str(batch)] = case
        log.info("%s batch %d: graph %.3f ms, eager %.3f ms", mode, batch, case.get("graph_ms", float("nan")),
                 case["eager_ms"])
    prompt = torch.randint(10, 30000, (args.prompt_len,), generator=gen).tolist()
    slot = slots[0]
    prefill = _instrumented(runner, prefill=True)
    result["prefill"] = {
        "prompt_len": args.prompt_len,
        "ms": timed(lambda: runner.prefill([0], [prompt], [slot], slot_bucket(slot, engine.bank.capacity)),
                    repeats=10),
    }
    try:
        result["prefill"]["profile"] = breakdown(lambda: prefill([0], [prompt], [slot],
                                                                  slot_bucket(slot, engine.bank.capacity)))
    except Exception as exc:  # a profiler failure keeps the timings already taken
        log.exception("prefill profile failed")
        result["prefill"]["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
    result["memory_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    engine.stop()
    return result


def _instrumented(runner: Any, *, prefill: bool = False) -> Callable[..., Any]:
    """A copy of the runner whose parts are wrapped in profiler ranges (graphs keep the plain one)."""
    import copy

    clone = copy.copy(runner)
    clone.bank = copy.copy(runner.bank)
    clone.pw = copy.copy(runner.pw)
    instrument(clone)
    return clone.prefill if prefill else clone.decode


def main() -> int:
    import torch
    from transformers import AutoTokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args()
    from benchmarks.serve_gpu import build_model, copy_bandwidth, load_model, write_adapters

    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["bandwidth"] = copy_bandwidth()
    bandwidth = report["bandwidth"]["tb_s"] * 1e12
    report["model_build_s"] = build_model(args.model_dir, smoke=False)
    model = load_model(args.model_dir, "nf4")
    adapters = write_adapters(model, args.model_dir.parent / f"{args.model_dir.name}-adapters", 4, 16)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    report["modes"] = {}
    for mode in args.modes.split(","):
        report["modes"][mode] = profile_mode(model, tokenizer, mode, adapters, args, bandwidth)
        args.out.write_text(json.dumps(report, indent=1))
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps(report, indent=1))
    if args.markdown is not None:
        args.markdown.write_text(markdown(report) + "\n")
    print(summary(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    """The breakdown as a Markdown table per engine mode (what benchmarks/results/*_profile_*.md holds)."""
    bandwidth = report["bandwidth"]["tb_s"]
    lines = [f"# One engine step on {report['device']} (torch {report['torch']})", "",
             f"Copy bandwidth measured in the same process: {bandwidth:.2f} TB/s (read + write). Model: "
             "Phi-3-mini's shape with random weights (3.82B), NF4 base, 4 random r=16 adapters; decode rows at "
             "position 160 of a 256-token cache, spread over the 4 adapters; prefill: one 128-token prompt. "
             "graph = CUDA-graph replay (what the server runs), eager = the same step without a graph; parts "
             "are kernel time inside profiler ranges of the eager step (no gaps), in ms.", ""]
    parts = ("base_weights", "dequantize", "lora", "lora_masks", "attention", "pointwise", "lm_head", "other")
    for mode, data in report["modes"].items():
        lines += [f"## nf4_mode:kernels = {mode}", "",
                  f"Weights read per step: {data['weight_bytes'] / 1e9:.2f} GB, floor "
                  f"{data['weight_floor_ms']:.3f} ms; KV cache {data['kv_cache_gib']:.1f} GiB; peak "
                  f"{data.get('memory_peak_gib', float('nan')):.1f} GiB. A one-row step through the 4-bit GEMV "
                  f"({data.get('gemv', '-')}) reads {data.get('one_row_weight_bytes', 0) / 1e9:.2f} GB, floor "
                  f"{data.get('one_row_floor_ms', float('nan')):.3f} ms.", "",
                  "| case | graph ms | eager ms | floor ms | kernels ms | kernel count | "
                  + " | ".join(parts) + " |", "|---" * (6 + len(parts)) + "|"]
        for name, case in [*data["decode"].items(), ("prefill", data["prefill"])]:
            prof = case.get("profile", {})
            cells = [f"{prof['parts_ms'][p]:.3f}" if "parts_ms" in prof else "-" for p in parts]
            label = f"decode batch {name}" if name != "prefill" else f"prefill {data['prefill']['prompt_len']}"
            graph = case.get("graph_ms")
            lines.append(f"| {label} | {graph:.3f} | " if graph is not None else f"| {label} | - | ")
            lines[-1] += (f"{case.get('eager_ms', case.get('ms')):.3f} | "
                          f"{case['floor_ms']:.3f} | " if "floor_ms" in case else
                          f"{case.get('eager_ms', case.get('ms')):.3f} | - | ")
            lines[-1] += (f"{prof.get('kernel_total_ms', float('nan')):.3f} | {prof.get('kernel_count', '-')} | "
                          + " | ".join(cells) + " |")
        lines.append("")
        lines += _families_table(data)
    return "\n".join(lines)


def _families_table(data: dict[str, Any]) -> list[str]:
    """Kernel time and launches per kernel family (by name), which also covers the Triton kernels."""
    cases = [(f"decode batch {name}", case.get("profile", {})) for name, case in data["decode"].items()]
    cases.append((f"prefill {data['prefill']['prompt_len']}", data["prefill"].get("profile", {})))
    families = sorted({f for _, prof in cases for f in prof.get("by_kernel_name_ms", {})})
    if not families:
        return []
    lines = ["Kernel families by name, ms / launches:", "",
             "| case | " + " | ".join(families) + " |", "|---" * (1 + len(families)) + "|"]
    for label, prof in cases:
        named = prof.get("by_kernel_name_ms", {})
        lines.append(f"| {label} | " + " | ".join(
            f"{named[f]['ms']:.3f} / {named[f]['count']}" if f in named else "-" for f in families) + " |")
    return [*lines, ""]


def summary(report: dict[str, Any]) -> str:
    lines = [f"{report['device']}: copy {report['bandwidth']['tb_s']:.2f} TB/s"]
    for mode, data in report["modes"].items():
        lines.append(f"{mode}: weights {data['weight_bytes'] / 1e9:.2f} GB, floor {data['weight_floor_ms']:.3f} ms")
        for batch, case in [*data["decode"].items(), ("prefill", data["prefill"])]:
            prof = case["profile"]
            parts = ", ".join(f"{k} {v:.3f}" for k, v in prof.get("parts_ms", {}).items()) or prof.get("error")
            lines.append(f"  {batch}: graph {case.get('graph_ms', float('nan')):.3f} eager "
                         f"{case.get('eager_ms', case.get('ms')):.3f} kernels "
                         f"{prof.get('kernel_total_ms', float('nan')):.3f} ms ({parts})")
            families = prof.get("by_kernel_name_ms", {})
            lines.append("    by name: " + ", ".join(f"{k} {v['ms']:.3f}/{v['count']}" for k, v in
                                                    sorted(families.items(), key=lambda kv: -kv[1]["ms"])))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
