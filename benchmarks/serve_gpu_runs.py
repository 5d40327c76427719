"""The timed generation runs of ``serve_gpu.py``: vanilla PEFT's ``generate`` and the engine's streams, each with
the same workload, plus adapter load times; one place for how a system is driven and timed, apart from checks and
reporting.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.serve_gpu_setup import device, sync

log = logging.getLogger("serve_gpu")  # one logger name for the whole benchmark's output


def vanilla_generate(peft_model: Any, prompts: list[tuple[int, ...]], names: list[str], new_tokens: int) -> float:
    import torch

    ids = torch.tensor(prompts, device=device())
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, adapter_names=names,
                                  pad_token_id=0)
    sync()
    elapsed = time.perf_counter() - started
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"vanilla generate made {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")
    return elapsed


def vanilla_suite(peft_model: Any, prompts: list[tuple[int, ...]], names: list[str], args: argparse.Namespace,
                  streams: list[int]) -> dict[str, Any]:
    new = args.new_tokens
    vanilla_generate(peft_model, prompts[:1], names[:1], 4)  # warm-up: kernels, cuBLAS handles
    first = vanilla_generate(peft_model, prompts[:1], names[:1], 1)
    total = vanilla_generate(peft_model, prompts[:1], names[:1], new)
    result: dict[str, Any] = {"batch1": {"ttft_ms": first * 1e3, "ms_per_token": total * 1e3 / new,
                                         "decode_ms_per_token": (total - first) * 1e3 / (new - 1)},
                              "streams": {}}
    for count in streams:
        for adapters in (1, len(names)):
            rows = [names[i % adapters] for i in range(count)]
            try:
                elapsed = vanilla_generate(peft_model, prompts[:count], rows, new)
            except RuntimeError as exc:  # e.g. out of memory at the largest batch: keep the other cases
                log.exception("vanilla %d streams over %d adapters failed", count, adapters)
                result["streams"][f"{count}x{adapters}"] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            result["streams"][f"{count}x{adapters}"] = {"tok_s": count * new / elapsed, "wall_s": elapsed}
            log.info("vanilla %d streams over %d adapters: %.1f tok/s", count, adapters, count * new / elapsed)
    return result


async def engine_streams(engine: Any, prompts: list[tuple[int, ...]], adapters: list[str | None],
                         new_tokens: int) -> dict[str, Any]:
    from persona_router.adapters.engine_api import GenerationRequest
    from persona_router.adapters.generation import SamplingConfig

    async def consume(handle: Any) -> tuple[float, float, int, str | None]:
        first, count, reason = 0.0, 0, None
        async for event in handle:
            if event.token_id is not None:
                count += 1
                if count == 1:
                    first = time.perf_counter()
            reason = event.finish_reason
        return first, time.perf_counter(), count, reason

    started = time.perf_counter()
    handles = [engine.submit(GenerationRequest(f"r{i}", prompt, adapter, SamplingConfig(max_new_tokens=new_tokens)))
               for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True))]
    done = await asyncio.gather(*(consume(h) for h in handles))
    wall = max(end for _, end, _, _ in done) - started
    ttft = sorted((first - started) * 1e3 for first, _, _, _ in done)
    tokens = sum(count for _, _, count, _ in done)
    complete = all(count == new_tokens and reason == "length" for _, _, count, reason in done)
    decode = [(end - first) * 1e3 / (count - 1) for first, end, count, _ in done if count > 1]
    return {"tok_s": tokens / wall, "wall_s": wall, "ttft_ms_p50": statistics.median(ttft), "ttft_ms_max": ttft[-1],
            "decode_ms_per_token": statistics.median(decode) if decode else None,
            "ms_per_token": wall * 1e3 / new_tokens, "complete": complete}


async def engine_suite(engine: Any, prompts: list[tuple[int, ...]], names: list[str], args: argparse.Namespace,
                       streams: list[int], *, single_adapter_too: bool = True) -> dict[str, Any]:
    engine.start(asyncio.get_running_loop())
    try:
        cases = [(1, 1)] + [(count, k) for count in streams
                            for k in ((1, len(names)) if single_adapter_too else (len(names),))]
        result: dict[str, Any] = {"streams": {}}
        for count, k in cases:
            adapters: list[str | None] = [names[i % k] for i in range(count)]
            await engine_streams(engine, prompts[:count], adapters, args.new_tokens)  # warm-up: graph captures
            measured = await engine_streams(engine, prompts[:count], adapters, args.new_tokens)
            if (count, k) == (1, 1):
                result["batch1"] = measured
            else:
                result["streams"][f"{count}x{k}"] = measured
            log.info("engine %d streams over %d adapters: %.1f tok/s", count, k, measured["tok_s"])
        result["graphs"] = ({"captures": engine.graphs.captures, "disabled": engine.graphs.disabled}
                            if engine.graphs is not None else None)
        return result
    finally:
        engine.stop()


def time_adapter_loads(engine: Any, peft_model: Any, folder: Path, repeats: int = 3) -> dict[str, float]:
    engine_times, peft_times = [], []
    for i in range(repeats):
        started = time.perf_counter()
        engine.add_adapter(f"load{i}", folder)
        sync()
        engine_times.append(time.perf_counter() - started)
        engine.remove_adapter(f"load{i}")
        started = time.perf_counter()
        peft_model.load_adapter(str(folder), adapter_name=f"load{i}")
        sync()
        peft_times.append(time.perf_counter() - started)
        peft_model.delete_adapter(f"load{i}")
    return {"engine_ms": statistics.median(engine_times) * 1e3, "peft_ms": statistics.median(peft_times) * 1e3}
