"""One launch of each 4-bit product kernel, for Nsight Compute's hardware counters.

Run under ``ncu --profile-from-start off``: every case is launched once to compile and warm up, then once more
between ``cudaProfilerStart`` and ``cudaProfilerStop``, so the report holds one launch of each case's kernels
(cuBLAS may add a split-K reduction kernel after its product; ncu flushes the caches before each, so the
weights come from memory as in a decode step). Cases: the K-major GEMV
(one row) at each Phi-3-mini projection's engine launch shape, the many-row kernel (``nf4_mma``) at its default
shapes for 8, 16 and 64 rows, the decode into a dense scratch (``dequantize_t``), and cuBLAS on a dense bf16
weight at 1 and 64 rows for comparison. The case names go to stderr in launch order.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... python3 benchmarks/ncu_kernels_gpu.py
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after the installed package: the repo root holds a bare persona_router folder

log = logging.getLogger("ncu_kernels_gpu")


def cases(rows: tuple[int, ...], projections: tuple[str, ...]) -> list[tuple[str, Callable[[], Any]]]:
    import torch
    from persona_router.adapters.engine import nf4_gemv, nf4_mma
    from persona_router.adapters.engine.weights import Gemv4bit

    from benchmarks.kernels_gpu_timing import SHAPES, quantized_copies
    from tests.support.nf4 import FakeLinear4bit

    out: list[tuple[str, Callable[[], Any]]] = []
    for name in projections:
        n, k = SHAPES[name]
        packed, state, _ = quantized_copies(n, k, 1)[0]
        g = Gemv4bit.of(FakeLinear4bit(packed, state))
        w = nf4_gemv.kmajor(g.packed, g.absmax, g.code, n, k, torch.bfloat16)
        assert w is not None
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        scratch = torch.empty(k, n, device="cuda", dtype=torch.bfloat16)
        x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        out.append((f"{name} gemv 1 row", lambda x=x1, w=w: nf4_gemv.gemv(x, w)))
        out.append((f"{name} cublas bf16 1 row", lambda x=x1, d=dense: x @ d.T))
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            shape = nf4_mma.default_shape(m, n, k)
            out.append((f"{name} mma {m} rows {shape}", lambda x=x, w=w, s=shape: nf4_mma.matmul(x, w, shape=s)))
        x64 = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
        out.append((f"{name} dequantize_t", lambda w=w, s=scratch: nf4_mma.dequantize_t(w, s)))
        out.append((f"{name} cublas bf16 64 rows", lambda x=x64, d=dense: x @ d.T))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="8,16,64", help="row counts of the many-row kernel")
    parser.add_argument("--projections", default="qkv,down")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import torch

    chosen = cases(tuple(int(r) for r in args.rows.split(",")), tuple(args.projections.split(",")))
    for _, fn in chosen:
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for index, (name, fn) in enumerate(chosen):
        log.info("launch %d: %s", index, name)
        fn()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
