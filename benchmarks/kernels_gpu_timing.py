"""Timing helpers shared by the GPU kernel benchmarks: CUDA-graph timing, quantised weight copies, shapes."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

SHAPES = {"qkv": (9216, 3072), "o": (3072, 3072), "gate_up": (16384, 3072), "down": (3072, 8192)}
ROTATE_BYTES = 240e6  # weight bytes cycled through per timing (several times the L2)


def rel(got: Any, want: Any) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def graph_ms(fns: list[Callable[[], Any]], replays: int = 15) -> float:
    """Median milliseconds per call: all ``fns`` captured once each in one CUDA graph, replayed."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # warm-up outside the capture: compilation, workspaces
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / len(fns)


def quantized_copies(n: int, k: int, copies: int) -> list[tuple[Any, Any, Any]]:
    import bitsandbytes.functional as bnbf
    import torch
    from persona_router.adapters.engine import nf4_kernels

    from tests.support.nf4 import FakeLinear4bit

    out = []
    for _ in range(copies):
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        weight = nf4_kernels.nf4_weight([FakeLinear4bit(packed, state)])
        assert weight is not None
        out.append((packed, state, weight))
    return out


def time_config(run: Callable[[Any], Any], weights: list[Any], want: Any, nbytes: int) -> dict[str, Any]:
    """One launch shape of a product: its error against ``want`` on the first weight copy and its graph-timed
    milliseconds over all copies (``run(weight)``), with the bandwidth of ``nbytes``; a shape the compiler or
    the launcher refuses is recorded with its error, so a sweep goes on."""
    try:
        err = rel(run(weights[0]), want)
        ms = graph_ms([partial(run, w) for w in weights])
    except Exception as exc:  # noqa: BLE001 - a shape that fails to compile is recorded, the rest go on
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"ms": ms, "rel_err": err, "tb_s": nbytes / ms / 1e9}


def best_config(configs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest timed shape among those within 2% relative error of the reference, or None."""
    timed = {c: v for c, v in configs.items() if "ms" in v and v["rel_err"] < 2e-2}
    if not timed:
        return None
    best = min(timed, key=lambda c: timed[c]["ms"])
    return {"config": best, **timed[best]}
