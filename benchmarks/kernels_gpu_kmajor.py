"""The K-major one-row NF4 GEMV (``adapters/engine/nf4_gemv.py``) over its launch shapes, for ``kernels_gpu.py``.

Per Phi-3-mini projection: every launch shape tried against bitsandbytes' GEMV and cuBLAS on a dense bf16 copy,
then, at the best shape, the LoRA expand and residual in the GEMV's epilogue against the separate expand kernel;
``write_shapes`` records each weight shape's fastest launch shape for a GPU in the engine's table.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path
from typing import Any

from benchmarks.kernels_gpu_timing import (
    ROTATE_BYTES,
    SHAPES,
    best_config,
    graph_ms,
    quantized_copies,
    rel,
    time_config,
)

log = logging.getLogger("kernels_gpu")


KMAJOR_BASES = ((64, 16, 4, False, 80), (128, 8, 4, False, 80), (32, 16, 4, False, 80), (128, 16, 4, False, 96),
                (64, 16, 8, False, 80), (64, 8, 4, True, 128), (64, 16, 4, False, None))
# The second H200 run (split-K 8 was the largest tried and the fastest for every shape): more splits, the bases
# that led.
KMAJOR_BASES_WIDE = ((64, 16, 4, False, 80), (32, 16, 4, False, 80), (64, 8, 4, False, 80), (128, 16, 4, False, 96),
                     (64, 16, 4, False, 80, True), (64, 16, 4, False, 128, True), (32, 16, 4, False, 128, True),
                     (64, 8, 4, False, 128, True))

# The software-pipelined loop (``Shape.stages``): longer loops (fewer splits) and deeper pipelines, against the
# engine's measured shape of each weight (``gemv_shapes.json``), timed in the same process.
KMAJOR_BASES_STAGED = tuple((bn, bkw, 4, False, reg, False, stages) for bn, bkw in ((64, 16), (64, 32), (128, 16))
                            for reg in (80, 128) for stages in (3, 4))
SWEEPS = {"narrow": (KMAJOR_BASES, (1, 2, 4, 8)), "wide": (KMAJOR_BASES_WIDE, (8, 16, 32)),
          "staged": (KMAJOR_BASES_STAGED, (1, 2, 4, 8))}


def kmajor_shapes(n: int, k: int, sweep: str = "narrow") -> list[Any]:
    """Every launch shape of the K-major GEMV tried: the sweep's bases (rows per program, words per step, warps,
    prefetch, register cap[, unrolled[, pipeline stages]]) times its split-K counts (``SWEEPS``), where it fits;
    the ``staged`` sweep also the engine's measured shape for this GPU."""
    import torch
    from persona_router.adapters.engine.nf4_gemv import Shape, measured_shape

    bases, splits = SWEEPS[sweep]
    shapes = [Shape(base[0], base[1], base[2], split, base[3], base[4], *base[5:]) for base in bases
              for split in splits]
    engine = measured_shape(torch.cuda.get_device_name(), n, k) if sweep == "staged" else None
    return [shape for shape in ([engine] if engine else []) + shapes if shape.fits(n, k)]


def kmajor_cases(bandwidth: float, sweep: str = "narrow") -> list[dict[str, Any]]:
    """One row: the K-major NF4 GEMV (``nf4_gemv``) over launch shapes, against bitsandbytes' GEMV (``Gemv4bit``,
    absmax decoded once, as the engine calls it) and cuBLAS on a dense bf16 copy; then, at the best shape, the
    projection as the engine runs it with a LoRA adapter and the residual: folded into the GEMV's epilogue,
    or added by the separate expand kernel after it, or after bitsandbytes' GEMV."""
    import torch
    import torch.nn.functional as F
    from persona_router.adapters.engine import lora_kernels, nf4_gemv
    from persona_router.adapters.engine.weights import Gemv4bit

    from tests.support.nf4 import FakeLinear4bit

    rows = []
    for name, (n, k) in SHAPES.items():
        nbytes = n * k // 2 + n * k // 64 * 4  # 4-bit codes and one float32 scale per 64 (both kernels read these)
        copies = quantized_copies(n, k, max(4, int(ROTATE_BYTES // nbytes) + 1))
        gemvs = [Gemv4bit.of(FakeLinear4bit(packed, state)) for packed, state, _ in copies]
        layouts = [nf4_gemv.kmajor(g.packed, g.absmax, g.code, n, k, torch.bfloat16) for g in gemvs]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                 for _ in range(max(3, int(ROTATE_BYTES // (2 * n * k)) + 1))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = nf4_gemv.reference(x, layouts[0])
        row: dict[str, Any] = {"shape": name, "n": n, "k": k, "bytes": nbytes, "copies": len(copies),
                               "floor_ms": nbytes / bandwidth * 1e3,
                               "cublas_bf16_ms": graph_ms([lambda d=d, x=x: F.linear(x, d) for d in dense]),
                               "bnb_gemv_ms": graph_ms([lambda g=g, x=x: g(x) for g in gemvs]),
                               "bnb_gemv_rel_err": rel(gemvs[0](x), want), "configs": {}}
        for shape in kmajor_shapes(n, k, sweep):
            row["configs"][str(tuple(vars(shape).values()))] = time_config(
                lambda w, t=shape, x=x: nf4_gemv.gemv(x, w, shape=t), layouts, want, nbytes)
        fastest = best_config(row["configs"])
        if fastest is not None:
            row["best"] = fastest
            best = next(s for s in kmajor_shapes(n, k, sweep) if str(tuple(vars(s).values())) == fastest["config"])
            row["epilogue"] = _epilogue_case(x, n, k, layouts, gemvs, best, lora_kernels, nf4_gemv)
        rows.append(row)
        log.info("kmajor %s: floor %.4f cublas %.4f bnb %.4f best %s", name, row["floor_ms"], row["cublas_bf16_ms"],
                 row["bnb_gemv_ms"], row.get("best"))
        del copies, gemvs, layouts, dense
        torch.cuda.empty_cache()
    return rows


def _epilogue_case(x: Any, n: int, k: int, layouts: list[Any], gemvs: list[Any], best: Any, lora_kernels: Any,
                   nf4_gemv: Any) -> dict[str, Any]:
    import torch

    capacity, rank = 8, 16
    a = torch.randn(capacity, rank, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    bt = torch.randn(capacity, rank, n, device="cuda", dtype=torch.bfloat16) * 0.02
    scaling = torch.full((capacity + 1,), 2.0, device="cuda", dtype=torch.bfloat16)
    slots = torch.tensor([3], device="cuda")
    residual = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    shrunk = lora_kernels.shrink(x, a, bt, slots, scaling, m=4)
    want = (nf4_gemv.reference(x, layouts[0], residual=residual).float()
            + lora_kernels.reference(x, a, bt, slots, scaling).float())
    fused = nf4_gemv.gemv(x, layouts[0], residual=residual, lora=shrunk, shape=best)
    apart = lora_kernels.expand_(nf4_gemv.gemv(x, layouts[0], shape=best), shrunk, residual)
    return {
        "fused_rel_err": rel(fused, want), "separate_rel_err": rel(apart, want),
        "kmajor_fused_ms": graph_ms([lambda w=w: nf4_gemv.gemv(x, w, residual=residual, lora=shrunk, shape=best)
                                     for w in layouts]),
        "kmajor_then_expand_ms": graph_ms([lambda w=w: lora_kernels.expand_(nf4_gemv.gemv(x, w, shape=best), shrunk,
                                                                            residual) for w in layouts]),
        "bnb_then_expand_ms": graph_ms([lambda g=g: lora_kernels.expand_(g(x), shrunk, residual) for g in gemvs]),
    }


def write_shapes(path: Path, device: str, rows: list[dict[str, Any]]) -> None:
    """Merge the fastest shape of each weight shape among ``rows`` (a ``Shape``'s fields in order; rows of
    several sweeps may name one weight shape) under ``device`` into ``path``."""
    table = json.loads(path.read_text()) if path.exists() else {}
    entries = table.setdefault(device, {})
    fastest: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = f"{row['n']}x{row['k']}"
        if "best" in row and (key not in fastest or row["best"]["ms"] < fastest[key]["ms"]):
            fastest[key] = row["best"]
    for key, best in fastest.items():
        entries[key] = list(ast.literal_eval(best["config"]))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)

