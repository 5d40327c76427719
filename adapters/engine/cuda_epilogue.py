"""What the CUDA C++ one-row kernels (``nf4_gemv_cuda``, ``dense_gemv_cuda``) share: the 16-bit conversions of
their device code, and the checks and launch operands of their epilogue (the LoRA expand of a ``LoraShrunk`` and
the residual, added before the one rounding)."""

from __future__ import annotations

from typing import Any

# Device helpers for the template's F16 switch (else bfloat16): a 16-bit value to float32, float32 rounded to it.
HALF_CONVERSIONS = r"""
__device__ __forceinline__ float to_f32(unsigned short h) {
#if F16
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  return __uint_as_float(((unsigned)h) << 16);
#endif
}

__device__ __forceinline__ unsigned short from_f32(float f) {
  unsigned short h;
#if F16
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
  return h;
}
"""


def check(n: int, dtype: Any, residual: Any, lora: Any) -> None:
    """ValueError unless the residual is a row-major ``[1, n]`` tensor of ``dtype`` and the LoRA operands are what
    the epilogue reads (``dtype`` Bt and int64 slot ids, rows contiguous)."""
    import torch

    if residual is not None and (residual.dtype != dtype or residual.stride(1) != 1
                                 or tuple(residual.shape) != (1, n)):
        raise ValueError(f"residual must be a row-major [1, {n}] {dtype} tensor")
    if lora is not None and (lora.bt.dtype != dtype or lora.bt.stride(2) != 1 or lora.slot_ids.dtype != torch.int64
                             or lora.t.stride(2) != 1):
        raise ValueError(f"the LoRA epilogue reads {dtype} Bt and int64 slot ids, rows contiguous")


def variant(residual: Any, lora: Any) -> tuple[int, int, bool, bool]:
    """The epilogue's compile-time constants: (LoRA rank, the shrink's K chunks, residual?, LoRA?)."""
    return (lora.rank if lora is not None else 0, lora.splits if lora is not None else 1, residual is not None,
            lora is not None)


def operands(out: Any, residual: Any, lora: Any) -> tuple[list[Any], list[int]]:
    """The kernels' epilogue arguments: pointers (residual, shrunk sums, Bt, slot ids; ``out`` stands in for an
    absent one, never read) and strides (the sums' per-chunk stride, Bt's per-slot and per-rank strides)."""
    if lora is None:
        return [residual if residual is not None else out, out, out, out], [0, 0, 0]
    return ([residual if residual is not None else out, lora.t, lora.bt, lora.slot_ids],
            [lora.t.stride(0), lora.bt.stride(0), lora.bt.stride(1)])


def device_index(device: Any) -> int:
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()
