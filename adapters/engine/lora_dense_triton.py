"""The Triton kernels behind ``lora_kernels.expand_`` for many rows: its own module, as ``mma_triton``.

Imports without Triton (every module must import on a CPU-only machine); ``lora_kernels`` launches it.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # lora_kernels checks require_triton() before any launch
    triton = None


if triton is not None:

    @triton.jit
    def lora_dense_t(t_ptr, slot_ptr, dense_ptr, width, stride_ts, stride_tm, stride_dm, R: tl.constexpr,
                     SPLITS: tl.constexpr, BW: tl.constexpr):
        """Columns ``BW * j ..`` of row ``m`` of ``dense`` ``[M, width]`` (``width = slots x R``): the shrink's
        ``R`` sums (its partials over K chunks added up, the scaling already in) at the columns of the row's own
        slot, zeros in every other slot's columns, so one library product with the bank's stacked ``Bt`` adds
        each row's own adapter: the zeros meet the other slots' ``Bt``, finite because the bank refuses
        non-finite weights at load, while a non-finite sum of a row's own adapter stays in that row."""
        m = tl.program_id(0)
        slot = tl.load(slot_ptr + m)
        cols = tl.program_id(1) * BW + tl.arange(0, BW)
        own = (cols // R == slot - 1) & (cols < width)
        acc = tl.zeros((BW,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(t_ptr + s * stride_ts + m * stride_tm + cols % R, mask=own, other=0.0)
        tl.store(dense_ptr + m * stride_dm + cols, acc.to(dense_ptr.dtype.element_ty), mask=cols < width)

    @triton.jit
    def lora_expand_dot(out_ptr, res_ptr, dense_ptr, b_ptr, M, N, W: tl.constexpr, stride_om, stride_rm, stride_dm,
                        stride_bw, BM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, HAS_RES: tl.constexpr,
                        PRECISION: tl.constexpr):
        """``out[tile] += dense[rows] @ b[:, cols] (+ residual)`` with one rounding, for a thin inner dimension ``W``
        (the resident slots' ranks): one program per ``BM x BN`` tile of ``out``, the product on the tensor cores,
        ``out`` read and written once (cuBLAS's in-place ``addmm_`` for this shape took about 5 us a launch)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        mask_m = rm < M
        mask_n = rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for w0 in range(0, W, BW):
            rw = w0 + tl.arange(0, BW)
            d = tl.load(dense_ptr + rm[:, None] * stride_dm + rw[None, :], mask=mask_m[:, None] & (rw < W)[None, :],
                        other=0.0)
            b = tl.load(b_ptr + rw[:, None] * stride_bw + rn[None, :], mask=(rw < W)[:, None] & mask_n[None, :],
                        other=0.0).to(d.dtype)
            acc = tl.dot(d, b, acc, input_precision=PRECISION)
        mask = mask_m[:, None] & mask_n[None, :]
        ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        out = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            out += tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (out + acc).to(out_ptr.dtype.element_ty), mask=mask)
