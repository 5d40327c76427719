"""Decoding speed of the batched engine on CPU, float32 vs bfloat16, in one run, with greedy agreement.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/decode_cpu.py

Loads the offline base once per precision (bare base, no adapter), then for each precision, interleaved
over ``--repeats`` rounds: ``--single`` demo prompts one at a time (batch 1) and ``--rows`` demo prompts
submitted together (one batched decode), each generating ``--new-tokens`` greedy tokens. Demo prompts: the
parallel questions of the demo data, each under a persona's system prompt (personas in turn), rendered
with the base's chat template exactly as the service renders them.

Greedy agreement is measured, not assumed: over every prompt that both precisions answered alone, the share
of answers whose tokens are identical, and the mean share of tokens generated before the first divergence.
Writes ``benchmarks/results/decode_cpu.json`` with the CPU (model name, bf16 flags), threads and load average.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from machine import cpu_model  # benchmarks/ is on sys.path when a benchmark runs as a script

RESULTS = Path(__file__).resolve().parent / "results" / "decode_cpu.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--single", type=int, default=8, help="prompts decoded alone per round (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=16, help="prompts decoded together (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from persona_router.adapters.base_model import BaseModelConfig, configure_threads, cpu_bf16_support, load_base
    from persona_router.adapters.engine import EngineConfig, build_engine
    from persona_router.core.atomic import atomic_write_json

    threads = configure_threads()
    load_before = os.getloadavg()
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    engines = {}
    for precision in precisions:
        base = load_base(BaseModelConfig(device="cpu", quantization=precision))
        engine = build_engine(base, EngineConfig(max_batch=max(args.rows, 1), max_len=1024))
        engine.warmup()
        engines[precision] = (base, engine)
    tokenizer = next(iter(engines.values()))[0].tokenizer
    prompts = demo_prompts(tokenizer, max(args.single * args.repeats, args.rows))

    timings: dict[str, dict[str, list[float]]] = {p: {"batch1": [], "rows": []} for p in precisions}
    alone: dict[str, dict[int, list[int]]] = {p: {} for p in precisions}
    together: dict[str, list[list[int]]] = {}
    for round_ in range(args.repeats):
        chosen = list(range(round_ * args.single, (round_ + 1) * args.single))
        for precision in precisions:
            engine = engines[precision][1]
            outputs, seconds = run(engine, [prompts[i] for i in chosen], args.new_tokens, together=False)
            alone[precision].update(zip(chosen, outputs, strict=True))
            timings[precision]["batch1"].append(sum(map(len, outputs)) / seconds)
            outputs, seconds = run(engine, prompts[: args.rows], args.new_tokens, together=True)
            together[precision] = outputs
            timings[precision]["rows"].append(sum(map(len, outputs)) / seconds)

    result: dict[str, Any] = {
        "benchmark": "decode_cpu",
        "conditions": {"new_tokens": args.new_tokens, "greedy": True, "single_prompts_per_round": args.single,
                       "rows": args.rows, "repeats": args.repeats, "adapter": None,
                       "base": engines[precisions[0]][0].name},
        "tokens_per_s": {p: {"batch1_median": round(statistics.median(t["batch1"]), 2),
                             f"rows{args.rows}_median": round(statistics.median(t["rows"]), 2),
                             "batch1_rounds": [round(v, 2) for v in t["batch1"]],
                             f"rows{args.rows}_rounds": [round(v, 2) for v in t["rows"]]}
                         for p, t in timings.items()},
        "machine": machine(threads, load_before),
        "cpu_bf16": cpu_bf16_support(),
    }
    if "fp32" in precisions:
        for precision in precisions:
            if precision == "fp32":
                continue
            result.setdefault("agreement_with_fp32", {})[precision] = {
                "alone": agreement(alone["fp32"], alone[precision]),
                f"rows{args.rows}": agreement(dict(enumerate(together["fp32"])), dict(enumerate(together[precision]))),
            }
            first = min(alone[precision])
            result.setdefault("examples", {})[precision] = {
                "prompt": tokenizer.decode(prompts[first]),
                "fp32": tokenizer.decode(alone["fp32"][first]),
                precision: tokenizer.decode(alone[precision][first]),
            }
    for _, engine in engines.values():
        engine.stop()
    atomic_write_json(args.out, result)
    for precision, numbers in result["tokens_per_s"].items():
        sys.stdout.write(f"{precision}: batch 1 {numbers['batch1_median']} tokens/s, {args.rows} rows "
                         f"{numbers[f'rows{args.rows}_median']} tokens/s\n")
    for precision, numbers in result.get("agreement_with_fp32", {}).items():
        sys.stdout.write(f"{precision} vs fp32: {numbers}\n")
    sys.stdout.write(f"wrote {args.out}\n")
    return 0


def demo_prompts(tokenizer: Any, count: int) -> list[tuple[int, ...]]:
    from persona_router.adapters.prompts import build_messages, prompt_ids
    from persona_router.core.pack import load_pack
    from persona_router.core.rows import demo_data_dir

    personas = load_pack("demo").personas
    questions = [q.strip() for q in (demo_data_dir() / "parallel_questions.txt").read_text("utf-8").splitlines()
                 if q.strip()]
    return [tuple(prompt_ids(tokenizer, build_messages(questions[i % len(questions)],
                                                       system_prompt=personas[i % len(personas)].system_prompt)))
            for i in range(count)]


def run(engine: Any, prompts: list[tuple[int, ...]], new_tokens: int, *,
        together: bool) -> tuple[list[list[int]], float]:
    """Generate for every prompt, all submitted at once (``together``) or each after the previous ended."""
    from persona_router.adapters.engine_api import GenerationRequest
    from persona_router.adapters.generation import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=new_tokens)

    async def collect(handle: Any) -> list[int]:
        return [event.token_id async for event in handle if event.token_id is not None]

    async def body() -> tuple[list[list[int]], float]:
        engine.start(asyncio.get_running_loop())
        try:
            started = time.perf_counter()
            requests = [GenerationRequest(f"r{i}", p, None, sampling) for i, p in enumerate(prompts)]
            if together:
                outputs = list(await asyncio.gather(*(collect(engine.submit(r)) for r in requests)))
            else:
                outputs = [await collect(engine.submit(r)) for r in requests]
            return outputs, time.perf_counter() - started
        finally:
            engine.stop()

    return asyncio.run(body())


def agreement(reference: dict[int, list[int]], other: dict[int, list[int]]) -> dict[str, Any]:
    keys = sorted(set(reference) & set(other))
    identical = sum(reference[k] == other[k] for k in keys)
    prefix = [_common_prefix(reference[k], other[k]) / max(len(reference[k]), 1) for k in keys]
    return {"prompts": len(keys), "identical": identical, "identical_share": round(identical / len(keys), 3),
            "mean_share_before_divergence": round(statistics.fmean(prefix), 3)}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def machine(threads: int, load_before: tuple[float, float, float]) -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }



if __name__ == "__main__":
    sys.exit(main())
