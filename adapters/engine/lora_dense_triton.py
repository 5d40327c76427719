"""The Triton kernel behind ``lora_kernels.expand_`` for many rows: its own module, as ``mma_triton``.

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
    def lora_dense_t(t_ptr, slot_ptr, dense_ptr, stride_ts, stride_tm, stride_dm, R: tl.constexpr,
                     SPLITS: tl.constexpr, WIDTH: tl.constexpr, WP: tl.constexpr):
        """Row ``m`` of ``dense`` ``[M, WIDTH]`` (``WIDTH = slots x R``): the shrink's ``R`` sums (its partials
        over K chunks added up, the scaling already in) at the columns of the row's own slot, exact zeros in
        every other slot's columns (written, never multiplied), so one library product with the bank's stacked
        ``Bt`` adds each row's own adapter and nothing else."""
        m = tl.program_id(0)
        slot = tl.load(slot_ptr + m)
        cols = tl.arange(0, WP)
        own = (cols // R == slot - 1) & (cols < WIDTH)
        acc = tl.zeros((WP,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(t_ptr + s * stride_ts + m * stride_tm + cols % R, mask=own, other=0.0)
        tl.store(dense_ptr + m * stride_dm + cols, acc.to(dense_ptr.dtype.element_ty), mask=cols < WIDTH)
