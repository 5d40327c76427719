"""The one-row product on a dense 16-bit weight as a CUDA C++ kernel (``EngineConfig.dense_gemv``).

At one row cuBLAS reads a Phi-3-mini projection's bf16 weight at 1.8-3.7 TB/s of the H200's 4.2, and the LoRA
expand and the residual are one more kernel after it. Here each warp owns ``rows_per_warp`` output rows; the
source issues a lane's 16-byte loads of a chunk of those rows (up to ``CHUNK`` per row) before any arithmetic
(ptxas then interleaves them with the FMAs at about 36 registers a thread: the loads in flight come from the
many resident warps), multiplies in float32 (the bf16 halves widened by a shift or a mask,
as cuBLAS accumulates in float32), and the warp's sum, the LoRA expand (lanes ``r < rank`` each take one rank,
summed by the same shuffle tree) and the residual meet in one rounding. No split K, so no workspace: results
are deterministic and a CUDA graph replays it as is.

Measured on an H200 (``benchmarks/results/kernels_gpu_dense_gemv_h200.json``, Phi-3-mini's projections): 2.7-3.9
TB/s against cuBLAS's 1.8-3.7, and with the LoRA expand and the residual 8-33% less time than cuBLAS's ``addmm``
and the expand kernel; batch-1 bf16 decoding 2.86 against 3.59 ms/token (``serve_gpu_dense_gemv_default_h200.json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from persona_router.adapters.engine.cuda_epilogue import HALF_CONVERSIONS

KERNEL = "dense_gemv_cuda"
CHUNK = 16  # 16-byte loads per row in flight per lane before the arithmetic that consumes them


@dataclass(frozen=True)
class DenseShape:
    """``warps`` per block, each owning ``rows_per_warp`` consecutive output rows."""

    warps: int = 4
    rows_per_warp: int = 1

    def fits(self, n: int, k: int) -> bool:
        return self.warps in (2, 4, 8, 16) and self.rows_per_warp in (1, 2, 4) and k % 8 == 0 and n >= 1


def default_shape(n: int, k: int) -> DenseShape:
    """4 warps of one row each: on an H200 the fastest of 12 shapes or within 1% of it for every Phi-3-mini
    projection (qkv 16.0 us against cuBLAS's 19.4, o 6.9 / 10.3, gate_up 25.8 / 27.4, down 15.4 / 19.1;
    ``benchmarks/results/kernels_gpu_dense_gemv_h200.json``); two or four rows per warp were up to 40% slower."""
    return DenseShape()


def runs(weight: Any) -> bool:
    """Whether this kernel reads ``weight``: a contiguous, 16-byte aligned [N, K] bf16 or fp16 CUDA tensor with
    K a multiple of 8."""
    import torch

    return (weight.dim() == 2 and weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)
            and weight.is_contiguous() and weight.shape[1] % 8 == 0 and weight.data_ptr() % 16 == 0)


@cache
def source(f16: bool, k: int, shape: DenseShape, rank: int, lora_splits: int, has_res: bool,
           has_lora: bool) -> str:
    consts = {"WARPS": shape.warps, "RPW": shape.rows_per_warp, "K8": k // 8, "CHUNK": CHUNK, "RANK": rank,
              "LSPLITS": lora_splits, "HAS_RES": int(has_res), "HAS_LORA": int(has_lora), "F16": int(f16)}
    defines = "\n".join(f"#define {name} {value}" for name, value in consts.items())
    return _TEMPLATE.replace("/*DEFINES*/", defines).replace("/*HALF*/", HALF_CONVERSIONS)


_TEMPLATE = r"""
/*DEFINES*/
#define STEPS ((K8 + 31) / 32)
// Lane steps past K: only where K is not a multiple of 256 (a compile-time false for Phi-3-mini's shapes).
#define STEP_OK(s) ((s) < STEPS && (K8 % 32 == 0 || (s) * 32 + lane < K8))
/*HALF*/

__device__ __forceinline__ float lo16(unsigned v) {
#if F16
  float f; unsigned short h = v & 0xffff;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  return __uint_as_float(v << 16);
#endif
}

__device__ __forceinline__ float hi16(unsigned v) {
#if F16
  float f; unsigned short h = v >> 16;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  return __uint_as_float(v & 0xffff0000u);
#endif
}

__device__ __forceinline__ float dot8(uint4 w, uint4 x, float acc) {
  acc = fmaf(lo16(w.x), lo16(x.x), acc); acc = fmaf(hi16(w.x), hi16(x.x), acc);
  acc = fmaf(lo16(w.y), lo16(x.y), acc); acc = fmaf(hi16(w.y), hi16(x.y), acc);
  acc = fmaf(lo16(w.z), lo16(x.z), acc); acc = fmaf(hi16(w.z), hi16(x.z), acc);
  acc = fmaf(lo16(w.w), lo16(x.w), acc); acc = fmaf(hi16(w.w), hi16(x.w), acc);
  return acc;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) dense_gemv_cuda(
    const uint4* __restrict__ w, const uint4* __restrict__ x, unsigned short* __restrict__ out,
    const unsigned short* __restrict__ res, const float* __restrict__ t, const unsigned short* __restrict__ bt,
    const long long* __restrict__ slots, int n, int t_stride, int bt_slot_stride, int bt_rank_stride) {
  const int lane = threadIdx.x & 31;
  const int first = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * RPW;
  if (first >= n) return;  // whole warps leave; nothing below synchronises the block
  float acc[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) acc[r] = 0.f;
#pragma unroll
  for (int c = 0; c < STEPS; c += CHUNK) {
    uint4 wv[RPW][CHUNK];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int row = first + r < n ? first + r : first;
#pragma unroll
      for (int i = 0; i < CHUNK; ++i) {
        if (STEP_OK(c + i)) wv[r][i] = __ldcs(w + (size_t)row * K8 + (c + i) * 32 + lane);
      }
    }
#pragma unroll
    for (int i = 0; i < CHUNK; ++i) {
      if (STEP_OK(c + i)) {
        const uint4 xv = __ldg(x + (c + i) * 32 + lane);
#pragma unroll
        for (int r = 0; r < RPW; ++r) acc[r] = dot8(wv[r][i], xv, acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int row = first + r;
    float total = warp_sum(acc[r]);
#if HAS_LORA
    const long long slot = slots[0];
    if (slot > 0) {
      float part = 0.f;
      if (lane < RANK && row < n) {
        float tr = 0.f;
        for (int s = 0; s < LSPLITS; ++s) tr += t[s * t_stride + lane];
        part = tr * to_f32(bt[(size_t)(slot - 1) * bt_slot_stride + (size_t)lane * bt_rank_stride + row]);
      }
      total += warp_sum(part);
    }
#endif
    if (lane == 0 && row < n) {
#if HAS_RES
      total += to_f32(res[row]);
#endif
      out[row] = from_f32(total);
    }
  }
}
"""


def dense_gemv(x: Any, weight: Any, *, residual: Any = None, lora: Any = None, shape: DenseShape | None = None
               ) -> Any:
    """``[residual +] x W^T [+ LoRA(x)]`` for one row ``x`` ([1, K]) and a dense ``weight`` ([N, K], ``runs``);
    ``lora`` is a ``LoraShrunk`` (``lora_kernels``) whose expand runs in the epilogue."""
    import persona_router.adapters.engine.cuda_epilogue as cuda_epilogue
    import torch

    if not runs(weight):
        raise ValueError("the dense CUDA GEMV reads a contiguous, 16-byte aligned [N, K] bf16/fp16 CUDA weight, "
                         "K a multiple of 8")
    n, k = weight.shape
    if x.dim() != 2 or x.shape != (1, k) or x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f"x must be a [1, {k}] {weight.dtype} tensor on {weight.device}, got "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.contiguous().clone()
    cuda_epilogue.check(n, weight.dtype, residual, lora)
    t = shape or default_shape(n, k)
    if not t.fits(n, k):
        raise ValueError(f"launch shape {t} does not fit N={n}, K={k}")
    out = torch.empty(1, n, dtype=weight.dtype, device=weight.device)
    launch = _launcher(weight.dtype == torch.float16, k, t, *cuda_epilogue.variant(residual, lora),
                       cuda_epilogue.device_index(weight.device))
    pointers, strides = cuda_epilogue.operands(out, residual, lora)
    rows_per_block = t.warps * t.rows_per_warp
    launch(grid=(-(-n // rows_per_block), 1, 1), block=(32 * t.warps, 1, 1),
           args=[weight, x, out, *pointers, n, *strides])
    return out


@cache
def _launcher(f16: bool, k: int, shape: DenseShape, rank: int, lora_splits: int, has_res: bool, has_lora: bool,
              device: int) -> Any:
    from persona_router.adapters.engine.cuda_rtc import kernel

    return kernel(source(f16, k, shape, rank, lora_splits, has_res, has_lora), KERNEL, f"cuda:{device}")
