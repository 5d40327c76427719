"""The many-row NF4 product (multi-stream decode, prefill) on the K-major copy the one-row GEMV reads.

With the one-row GEMV (``nf4_gemv``) this makes the ``fused`` mode whole: one 4-bit copy of each weight serves
every step and no 16-bit copy of the model is kept (the ``dequantize`` mode keeps a bf16 copy of every weight,
4x the bytes; wide products here decode one weight at a time into a scratch buffer, see below).

The kernel (``mma_triton.nf4_mma_kmajor``) loads ``BKW`` words of ``BN`` weight rows per step from the
``[K // 8, N]`` word array (rows along the fast axis: whole cache lines), decodes each word's eight codes by
register permutes (``nf4_dot_asm.unpack_ptx``, the GEMV's lookup without its products), multiplies by the block
scale in float32, rounds once to the activations' 16-bit type, joins the eight element tensors into one
``[8 BKW, BN]`` tile in K order and runs one tensor-core product per step against the contiguous activations.
For few rows the eight element tensors go to eight ``[BM, BKW] x [BKW, BN]`` products instead (``slices``), one
per element position of the words, against strided activation columns: no tile is re-ordered in registers.
Best launch shape per variant, one H200 sweep each, microseconds for qkv / o / gate_up / down (the K-slice numbers
come from this kernel's first version, the same loop body in a kernel without the joined-tile branch:
``benchmarks/results/kernels_gpu_mma_first_h200.json``; the committed ``SLICES`` branch was not timed; the joined
tile: ``kernels_gpu_mma_h200.json``): 2 rows 20.7 / 9.8 / 31.1 / 19.5 against 32.0 / 13.8 / 48.6 / 30.1 (cuBLAS on
a dense bf16 weight: 19.3 / 10.4 / 27.8 / 19.1); 16 rows 40.7 / 20.4 / 46.2 / 36.2 against 38.7 / 19.8 / 55.9 /
33.6; 64 rows 176 / 93 / 180 / 161 against 60 / 42 / 64 / 56.

Split K keeps every multiprocessor busy when ``N / BN`` tiles are few; the residual rides in the epilogue, and so
does the LoRA update of each row's own adapter where the runner's Triton shrink ran (up to
``lora_kernels.GATHER_ROWS`` rows), as in the GEMV.

The loop software-pipelined (``MmaShape.pipe``, the words' and scales' loads in flight ahead of their decode;
``benchmarks/results/kernels_gpu_session7_h200.json``) took 9-33% off the joined tile at 64 rows (qkv 53.4
against 59.1 us, o 36.5 against 54.1) and up to 10% off the K-slice products at 8 rows for gate_up and down
(39.0 against 43.2, 24.0 against 26.8; qkv and o unchanged): still 1.8-4.3x cuBLAS on a dense bf16 weight at 64
rows, so the defaults stay. Nsight Compute (``ncu_kernels_h200_session7.csv``) puts the K-slice kernel at 8 rows
at 11% of DRAM bandwidth while its busiest memory unit is 67% busy ("Mem Busy"; consistent with the decoded tile's
trip through shared memory into the tensor cores' operand layout, not proven), and the joined tile at 64 rows at
0.36 waves of programs (144 for qkv, 7% achieved occupancy).

Where it stands: at 64 rows the joined tile takes 60 us for qkv (0.26 TB/s of its 4-bit bytes; o 0.13, gate_up
0.45, down 0.25) against 17.9 us for cuBLAS on a dense bf16 weight; pipelining its loads (above) does not close
that. From ``DEQUANTIZE_ROWS`` rows the product therefore decodes the weight into a scratch buffer (one
projection at a time, ``dequantize_t``: 19.1 us for qkv under Nsight Compute, writing 56.6 MB) and multiplies on
cuBLAS: a transient 16-bit copy of one weight, never of the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
MAX_SPLIT = 8
# From this many rows the product runs on cuBLAS over a dense copy of this one weight, decoded into a scratch
# buffer the size of the largest projection. Measured on an H200 (the module docstring's files; us for qkv / o /
# gate_up / down): decode-then-cuBLAS 37.7 / 16.1 / 65.1 / 34.8 at 2 rows and 38.2 / 15.7 / 65.3 / 34.3 at 16;
# the K-slice kernel at ``default_shape``'s launch shapes 20.7 / 9.8 / 31.1 / 19.5 at 2 rows but 50.9 / 22.4 /
# 64.8 / 38.2 at 16. Where between 2 and 16 rows the two cross was not measured; 9 keeps 8-stream decoding on the
# kernel. (The serving runs of the fifth H200 round used 17.)
DEQUANTIZE_ROWS = 9


@dataclass(frozen=True)
class MmaShape:
    """A launch shape: ``bm x bn`` output tiles, ``bkw`` words of K (8 elements each) per loop step, ``split_k``
    programs per tile (the last one to finish adds the partial sums), ``stages`` software-pipeline depth of the
    loads that feed a product directly (the activations), ``slices`` eight K-slice products per step instead of one
    joined tile (see the module docstring), ``pipe`` above 1 the pipeline depth of the loop itself (the words and
    scales too, which reach the product only through the decode)."""

    bm: int = 64
    bn: int = 64
    bkw: int = 16
    warps: int = 4
    stages: int = 2
    split_k: int = 1
    slices: bool = False
    pipe: int = 1

    def fits(self, n: int, k: int) -> bool:
        words = k // 8
        tiles_ok = all(size >= 16 and size & (size - 1) == 0 for size in (self.bm, self.bn, self.bkw))
        return (tiles_ok and k % 128 == 0 and 1 <= self.pipe <= 8 and 1 <= self.split_k <= MAX_SPLIT
                and words % self.split_k == 0 and (words // self.split_k) % self.bkw == 0 and n >= 1)


def default_shape(m: int, n: int, k: int) -> MmaShape:
    """Up to 16 rows the K-slice products, split K toward 1024 programs (at 2 rows the measured best split was 8 for
    qkv, o and down, 4 for gate_up); more rows one joined tile per step, split K until the grid covers the
    H200's 132 multiprocessors (the measured best at 64 rows for qkv and gate_up; o and down measured faster with
    one pipeline stage). The engine launches these up to ``DEQUANTIZE_ROWS``; the rest serve the benchmark."""
    slices = m <= 16
    bm = 16 if slices else 32 if m <= 32 else 64 if m <= 64 else 128
    tiles = -(-n // 64) * -(-m // bm)
    target = 1024 if slices else 132
    fitting = [MmaShape(bm=bm, split_k=split, slices=slices) for split in (1, 2, 4, 8)]
    fitting = [shape for shape in fitting if shape.fits(n, k)]
    if not fitting:
        raise ValueError(f"no launch shape of the 4-bit product fits K={k} (needs a multiple of 128)")
    return next((shape for shape in fitting if tiles * shape.split_k >= target), fitting[-1])


def matmul(x: Any, w: Any, *, residual: Any = None, lora: Any = None, shape: MmaShape | None = None,
           workspace: Any = None) -> Any:
    """``[residual +] x W^T [+ LoRA(x)]`` for ``x`` of any row count ([M, K]); ``w`` is an ``nf4_gemv.KMajor``,
    ``lora`` a ``LoraShrunk`` (``lora_kernels``), added with ``residual`` in the kernel's epilogue. Without a
    ``shape``, one row goes to the K-major GEMV (``nf4_gemv.gemv``) and ``DEQUANTIZE_ROWS`` or more to
    ``dequantize_t`` and cuBLAS."""
    import torch
    from persona_router.adapters.engine.nf4_kernels import _SHARED, product_operands
    from persona_router.adapters.engine.triton_ops import require_triton

    require_triton()
    import persona_router.adapters.engine.mma_triton as mma_triton

    if shape is None and x.dim() == 2 and x.shape[0] == 1:
        from persona_router.adapters.engine.nf4_gemv import gemv

        return gemv(x, w, residual=residual, lora=lora, workspace=workspace)
    x, out = product_operands(x, w.k, w.n, residual)
    if x.dtype != (torch.float16 if w.f16 else torch.bfloat16):
        raise ValueError(f"x is {x.dtype}; this weight was laid out for {'float16' if w.f16 else 'bfloat16'}")
    m = x.shape[0]
    if m == 0:
        return out
    if shape is None and m >= DEQUANTIZE_ROWS:
        return _dequantized_product(x, w, out, residual, lora, workspace or _SHARED)
    t = shape or default_shape(m, w.n, w.k)
    if not t.fits(w.n, w.k):
        raise ValueError(f"launch shape {t} does not fit N={w.n}, K={w.k}")
    grid = (-(-w.n // t.bn), -(-m // t.bm), t.split_k)
    ws, counters = ((workspace or _SHARED).get(x.device, w.n, m, t.split_k, grid[0] * grid[1], tag="mma")
                    if t.split_k > 1 else (out, out))
    has_lora = lora is not None
    tl_t, tl_bt, slots = (lora.t, lora.bt, lora.slot_ids) if has_lora else (out, out, out)
    mma_triton.nf4_mma_kmajor[grid](
        x, w.words, w.scales, w.code, w.table, out, residual if residual is not None else out, tl_t, tl_bt, slots,
        ws, counters, m, w.n, w.k, x.stride(0), out.stride(0), residual.stride(0) if residual is not None else 0,
        tl_t.stride(0) if has_lora else 0, tl_t.stride(1) if has_lora else 0,
        tl_bt.stride(0) if has_lora else 0, tl_bt.stride(1) if has_lora else 0,
        R=lora.rank if has_lora else 0, SPLITS=lora.splits if has_lora else 1,
        RP=lora.rank_pow2 if has_lora else 1, HAS_RES=residual is not None, HAS_LORA=has_lora, BM=t.bm, BN=t.bn,
        BKW=t.bkw, SPLIT_K=t.split_k, EVEN_N=w.n % t.bn == 0, F16=w.f16, ASM=w.unpack_asm, SLICES=t.slices,
        PIPE=t.pipe, num_warps=t.warps, num_stages=t.stages)
    return out


def dequantize_t(w: Any, out: Any) -> Any:
    """Decode the K-major weight into ``out``, a contiguous ``[K, N]`` tensor of the activations' dtype, as the
    dense transposed weight (one kernel): each value the 16-bit table entry times its float32 scale, rounded once."""
    import persona_router.adapters.engine.mma_triton as mma_triton
    import torch

    bn, bkw = 64, 16
    if w.k % (8 * bkw):
        raise ValueError(f"the dense copy needs K a multiple of {8 * bkw}, got {w.k}")
    dtype = torch.float16 if w.f16 else torch.bfloat16
    if tuple(out.shape) != (w.k, w.n) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{w.k}, {w.n}] {dtype} tensor, got {tuple(out.shape)} "
                         f"{out.dtype}{'' if out.is_contiguous() else ' (not contiguous)'}")
    mma_triton.kmajor_dequant[(-(-w.n // bn), w.k // 8 // bkw)](
        w.words, w.scales, w.code, w.table, out, w.n, BN=bn, BKW=bkw, F16=w.f16, ASM=w.unpack_asm, num_warps=4)
    return out


def _dequantized_product(x: Any, w: Any, out: Any, residual: Any, lora: Any, workspace: Any) -> Any:
    import torch
    from persona_router.adapters.engine.lora_kernels import expand_

    dense = dequantize_t(w, workspace.scratch(x.device, w.k * w.n, x.dtype).view(w.k, w.n))
    if lora is not None:
        return expand_(torch.matmul(x, dense, out=out), lora, residual)
    if residual is not None:
        return torch.addmm(residual, x, dense, out=out)
    return torch.matmul(x, dense, out=out)
