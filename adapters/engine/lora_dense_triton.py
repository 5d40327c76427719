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
