"""The many-row NF4 product on the K-major copy (``adapters/engine/nf4_mma.py``) over launch shapes, for
``kernels_gpu.py`` (section ``mma``).

Per Phi-3-mini projection and row count (2-64: decode of that many streams; 128 and up: prefill chunks), every
launch shape tried against cuBLAS on a dense bf16 copy (what the ``dequantize`` mode runs: its weights are that
copy) and bitsandbytes' dequantisation into a reused bf16 scratch followed by cuBLAS (what a 4-bit model costs
without a fused kernel). Same timing as the other sections: one launch per weight copy in a CUDA graph, enough
copies that the L2 cache cannot serve them.
"""

from __future__ import annotations

import logging
from functools import partial
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
ROWS = (2, 16, 32, 64, 128, 512, 2048)


def mma_shapes(m: int, n: int, k: int, pipe_only: bool = False) -> list[Any]:
    """The default shape and a sweep of tiles, warps, pipeline depth and split K around it; with ``pipe_only``
    the default and its software-pipelined variants alone."""
    from persona_router.adapters.engine.nf4_mma import MmaShape, default_shape

    bms = (16,) if m <= 16 else (32,) if m <= 32 else (64,) if m <= 64 else (128, 64)
    shapes = [default_shape(m, n, k)]
    for bm in bms:
        for bn, warps in ((64, 4), (128, 4), (128, 8)):
            for split in ((1, 2, 4, 8) if m <= 64 else (1,)):
                shapes.append(MmaShape(bm=bm, bn=bn, bkw=16, warps=warps, stages=2, split_k=split))
    shapes += [MmaShape(bm=bms[0], bn=64, bkw=16, warps=4, stages=s, split_k=4 if m <= 64 else 1) for s in (1, 3)]
    shapes += [MmaShape(bm=bms[0], bn=64, bkw=32, warps=4, stages=2, split_k=4 if m <= 64 else 1)]
    shapes += [MmaShape(bm=bms[0], bn=64, bkw=16, warps=4, stages=2, split_k=s, slices=True) for s in (2, 4, 8)
               if m <= 64]
    # the loop software-pipelined (``pipe``): the words' and scales' loads in flight ahead of their decode
    piped = [MmaShape(bm=bms[0], bn=64, bkw=16, warps=4, stages=2, split_k=s, slices=sl, pipe=3)
             for sl in ((True, False) if m <= 16 else (False,)) for s in (1, 2, 4, 8) if m <= 64]
    shapes = shapes[:1] + piped if pipe_only else shapes + piped
    unique = list(dict.fromkeys(s for s in shapes if s.fits(n, k)))
    tiles = {s: -(-n // s.bn) * -(-m // s.bm) * s.split_k for s in unique}
    # a grid far under the multiprocessor count cannot stream the weights; skip what cannot win
    return [s for s in unique if tiles[s] >= 66 or s == shapes[0]]


def mma_cases(bandwidth: float, rows: tuple[int, ...] = ROWS, pipe_only: bool = False) -> list[dict[str, Any]]:
    import bitsandbytes.functional as bnbf
    import torch
    import torch.nn.functional as F
    from persona_router.adapters.engine import nf4_gemv, nf4_mma
    from persona_router.adapters.engine.weights import Gemv4bit

    from tests.support.nf4 import FakeLinear4bit

    out = []
    for name, (n, k) in SHAPES.items():
        nbytes = n * k // 2 + n * k // 64 * 4
        copies = quantized_copies(n, k, max(4, int(ROTATE_BYTES // nbytes) + 1))
        gemvs = [Gemv4bit.of(FakeLinear4bit(packed, state)) for packed, state, _ in copies]
        layouts = [nf4_gemv.kmajor(g.packed, g.absmax, g.code, n, k, torch.bfloat16) for g in gemvs]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                 for _ in range(max(3, int(ROTATE_BYTES // (2 * n * k)) + 1))]
        scratch = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        scratch_t = torch.empty(k, n, device="cuda", dtype=torch.bfloat16)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = nf4_gemv.reference(x, layouts[0])

            def dequant_cublas(packed: Any, state: Any, x: Any = x, out: Any = scratch) -> Any:
                bnbf.dequantize_4bit(packed, state, out=out)
                return F.linear(x, out)

            def kmajor_dequant_cublas(w: Any, x: Any = x, out: Any = scratch_t) -> Any:
                return x @ nf4_mma.dequantize_t(w, out)

            flops = 2 * m * n * k
            row: dict[str, Any] = {
                "shape": name, "m": m, "n": n, "k": k, "bytes": nbytes, "floor_ms": nbytes / bandwidth * 1e3,
                "flop_floor_ms": flops / 800e12 * 1e3,
                "cublas_bf16_ms": graph_ms([partial(F.linear, x, d) for d in dense]),
                "bnb_dequant_cublas_ms": graph_ms([partial(dequant_cublas, p, s) for p, s, _ in copies]),
                "kmajor_dequant_cublas_ms": graph_ms([partial(kmajor_dequant_cublas, w) for w in layouts]),
                "kmajor_dequant_rel_err": rel(kmajor_dequant_cublas(layouts[0]), want),
                "configs": {}}
            for shape in mma_shapes(m, n, k, pipe_only):
                entry = time_config(lambda w, t=shape, x=x: nf4_mma.matmul(x, w, shape=t), layouts, want, nbytes)
                if "ms" in entry:
                    entry["tflop_s"] = flops / entry["ms"] / 1e9
                row["configs"][str(tuple(vars(shape).values()))] = entry
            default = str(tuple(vars(nf4_mma.default_shape(m, n, k)).values()))
            row["default"] = {"config": default, **row["configs"].get(default, {})}
            fastest = best_config(row["configs"])
            if fastest is not None:
                row["best"] = fastest
            out.append(row)
            log.info("mma %s m=%d: floor %.4f cublas %.4f deq+cublas %.4f default %s best %s", name, m,
                     row["floor_ms"], row["cublas_bf16_ms"], row["bnb_dequant_cublas_ms"], row["default"].get("ms"),
                     row.get("best"))
        del copies, gemvs, layouts, dense, scratch, scratch_t
        torch.cuda.empty_cache()
    return out


def summary(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        best, default = row.get("best", {}), row.get("default", {})
        lines.append(f"mma {row['shape']:8s} m={row['m']:5d} floor {row['floor_ms'] * 1e3:7.1f} us | cublas-bf16 "
                     f"{row['cublas_bf16_ms'] * 1e3:7.1f} bnb-deq+cublas {row['bnb_dequant_cublas_ms'] * 1e3:7.1f} "
                     f"kmajor-deq+cublas {row['kmajor_dequant_cublas_ms'] * 1e3:7.1f} | "
                     f"default {default.get('ms', float('nan')) * 1e3:7.1f} | best {best.get('config')} "
                     f"{best.get('ms', float('nan')) * 1e3:7.1f} us err {best.get('rel_err', float('nan')):.1e}")
    return lines
