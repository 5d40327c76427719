"""One engine per GPU in one pool (``serve --devices``): throughput and latency on 1, 2 (and 4) GPUs.

Model: the random Phi-3-mini-shaped model of ``serve_gpu.py`` (3.82B parameters) in NF4 on every GPU, 16 random
r=16 all-linear LoRA adapters. Workload per point: ``streams`` concurrent streams (64 and 256), each a random
128-token prompt with 64 new tokens, greedy, no early stop, adapters cycling over the 16; requests go through
``UpstreamPool`` exactly as in the service (rendezvous affinity on the adapter, spill-over past
``--max-batch`` requests per GPU, adapters loaded on their home GPU when registered). For each GPU count it
reports aggregate generated tokens/s, p50/p95 request latency, adapter loads per GPU and requests per GPU, and
the scaling efficiency ``tokens/s(n) / (n * tokens/s(1))`` (target >= 0.9 at 2 GPUs).

    python3 benchmarks/serve_multigpu.py --out benchmarks/results/serve_multigpu_h200x2.json   # on a multi-GPU host
    python benchmarks/serve_multigpu.py --smoke --out /tmp/multigpu_smoke.json               # CPU check of this script

The JSON is rewritten after every point. Exit status 1 when a stream did not deliver all its tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import serve_gpu  # noqa: E402 - the model, adapters and prompts of the one-GPU benchmark

log = logging.getLogger("serve_multigpu")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/persona-router-bench/phi3-mini-random"))
    parser.add_argument("--gpus", default="auto", help="comma-separated GPU counts, or auto: 1, 2 and 4 as available")
    parser.add_argument("--streams", default="64,256")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=64, help="rows per forward pass and per GPU")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, two CPU engines: checks the script")
    return parser.parse_args()


def gpu_counts(spec: str, smoke: bool) -> list[int]:
    import torch

    if spec != "auto":
        return [int(n) for n in spec.split(",")]
    available = 2 if smoke else torch.cuda.device_count()
    return [n for n in (1, 2, 4) if n <= available]


def build_pool(count: int, args: argparse.Namespace, adapters: list[Path]) -> tuple[Any, list[Any]]:
    from persona_router.adapters.base_model import BaseModelConfig, load_base
    from persona_router.adapters.engine import EngineConfig, build_engine
    from persona_router.adapters.engine_member import EngineMember
    from persona_router.adapters.upstream_member import PoolConfig
    from persona_router.adapters.upstream_pool import UpstreamPool

    members, engines = [], []
    for index in range(count):
        device = "cpu" if args.smoke else f"cuda:{index}"
        base = load_base(BaseModelConfig(base=str(args.model_dir), device=device,
                                         quantization="fp32" if args.smoke else "nf4"))
        config = EngineConfig(max_batch=args.max_batch, max_queue=4096, max_adapters=len(adapters) + 2,
                              max_len=args.prompt_len + args.new_tokens + 8)
        engine = build_engine(base, config)
        engines.append(engine)
        members.append(EngineMember(device if not args.smoke else f"cpu#{index}", engine))
    pool = UpstreamPool(members, PoolConfig(max_in_flight=args.max_batch, max_queue=4096, health_interval_s=5.0))
    return pool, engines


async def run_point(pool: Any, names: list[str], prompts: list[tuple[int, ...]], streams: int,
                    new_tokens: int) -> dict[str, Any]:
    from persona_router.adapters.engine_api import GenerationRequest
    from persona_router.adapters.generation import SamplingConfig

    latencies: list[float] = []
    short: list[str] = []
    tokens = 0

    async def one(index: int) -> None:
        nonlocal tokens
        request = GenerationRequest(f"s{streams}-{index}", prompts[index % len(prompts)], names[index % len(names)],
                                    SamplingConfig(max_new_tokens=new_tokens))
        started = time.perf_counter()
        got = len([event async for event in pool.submit(request) if event.token_id is not None])
        latencies.append(time.perf_counter() - started)
        tokens += got
        if got != new_tokens:
            short.append(f"{request.request_id}: {got} tokens")

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"streams": streams, "wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(ordered[len(ordered) // 2], 3),
            "latency_p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
            "latency_mean_s": round(statistics.fmean(ordered), 3), "short_streams": short}


async def measure(count: int, args: argparse.Namespace, adapters: list[Path], prompts: list[tuple[int, ...]],
                  streams: list[int]) -> dict[str, Any]:
    pool, engines = await asyncio.to_thread(build_pool, count, args, adapters)
    pool.start(asyncio.get_running_loop())
    try:
        if await pool.wait_up(300) != count:
            raise RuntimeError(f"only {sum(m['up'] for m in pool.describe())} of {count} engines came up")
        names = [f"adapter{i}@1" for i in range(len(adapters))]
        started = time.perf_counter()
        for name, folder in zip(names, adapters, strict=True):
            await asyncio.to_thread(pool.add_adapter, name, folder)
        load_s = time.perf_counter() - started
        await run_point(pool, names, prompts, min(streams), 4)  # warm-up: graphs, kernels, first adapter use
        points = [await run_point(pool, names, prompts, n, args.new_tokens) for n in streams]
        return {"gpus": count, "adapter_registration_s": round(load_s, 2), "points": points,
                "members": [{k: m[k] for k in ("name", "requests", "adapter_loads", "adapters", "retries")}
                            for m in pool.describe()]}
    finally:
        await asyncio.to_thread(pool.stop)
        del engines
        gc.collect()
        serve_gpu.free_memory()


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args()
    if args.smoke:
        args.model_dir = Path("/tmp/persona-router-bench/phi3-tiny-random-multigpu")
    serve_gpu.build_model(args.model_dir, args.smoke)
    from transformers import AutoModelForCausalLM

    skeleton = AutoModelForCausalLM.from_pretrained(args.model_dir)
    adapters = serve_gpu.write_adapters(skeleton, args.model_dir.parent / f"{args.model_dir.name}-adapters",
                                        args.adapters, 16)
    vocab = skeleton.config.vocab_size
    del skeleton
    gc.collect()
    streams = [int(n) for n in args.streams.split(",")]
    prompts = serve_gpu.make_prompts(max(streams), args.prompt_len, vocab)
    report: dict[str, Any] = {"benchmark": "serve_multigpu", "smoke": args.smoke, "environment": environment(),
                              "workload": {"adapters": args.adapters, "prompt_len": args.prompt_len,
                                           "new_tokens": args.new_tokens, "max_batch_per_gpu": args.max_batch,
                                           "precision": "fp32 (smoke)" if args.smoke else "nf4"},
                              "runs": []}
    for count in gpu_counts(args.gpus, args.smoke):
        report["runs"].append(asyncio.run(measure(count, args, adapters, prompts, streams)))
        report["scaling"] = scaling(report["runs"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 1 if any(p["short_streams"] for run in report["runs"] for p in run["points"]) else 0


def scaling(runs: list[dict[str, Any]]) -> dict[str, Any]:
    one = next((r for r in runs if r["gpus"] == 1), None)
    if one is None:
        return {}
    base = {p["streams"]: p["tokens_per_s"] for p in one["points"]}
    return {f"{r['gpus']}gpu_{p['streams']}streams": round(p["tokens_per_s"] / (r["gpus"] * base[p["streams"]]), 3)
            for r in runs if r["gpus"] > 1 for p in r["points"] if base.get(p["streams"])}


def environment() -> dict[str, Any]:
    import torch

    info = serve_gpu.environment()
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


if __name__ == "__main__":
    sys.exit(main())
