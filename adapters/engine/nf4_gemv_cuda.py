"""The one-row NF4 product on the K-major copy (``nf4_gemv.KMajor``) as a CUDA C++ kernel (``gemv="cuda"``).

Same layout, same decode (the ``nf4_dot_asm`` PTX: byte permutes into 16-bit pairs, packed FMAs) and same
epilogue (LoRA expand, residual, one rounding) as the Triton GEMV, with the loop structure written out. A block
owns 128 output rows (32 lanes x one 16-byte vector of four rows) and one slice of K; each warp of the block
takes whole 64-element quantisation blocks of that slice. A thread's loads run ``CudaShape.depth`` blocks ahead of
its decoding (by default all of them: with one block per warp, nine independent 16-byte loads in flight per thread
before any arithmetic, where the Triton kernel's loop waits a memory latency per step). The warps' partial sums
meet in shared memory in a fixed order; split K ends as in the Triton kernels (each block writes its partial row,
the last to arrive adds them in order and resets its counter), so results are deterministic and graph replays
find the counters at zero.

Measured on an H200 (``benchmarks/results/kernels_gpu_cuda_gemv_h200.json``): no faster than the Triton GEMV
(qkv 11.6 against 10.9 us, 1.3-1.7 TB/s), so it is opt-in. A projection's weight is about one wave of blocks that
all load, then all decode (about 30 instructions per eight weights), so the two phases add up; the README's eighth
H200 round has the numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from persona_router.adapters.engine.cuda_epilogue import HALF_CONVERSIONS

QBLOCK = 64  # nf4_gemv.QBLOCK (not imported: nf4_gemv dispatches here, so the import would be a cycle)
ROWS_PER_BLOCK = 128  # 32 lanes x 4 rows (one int4 of words)
WARPS = (4, 8, 16)
KERNEL = "nf4_gemv_cuda"


@dataclass(frozen=True)
class CudaShape:
    """``warps`` per block (each takes whole 64-element blocks of K), ``split_k`` blocks per 128 output rows,
    ``depth`` how far the loads run ahead (a ring of that many blocks' words in registers)."""

    warps: int = 8
    split_k: int = 1
    depth: int = 0  # quantisation blocks whose loads run ahead of the arithmetic; 0: all of a warp's at once

    def blocks_per_warp(self, k: int) -> int:
        per_split = -(-(k // QBLOCK) // self.split_k)
        return -(-per_split // self.warps)

    def depth_for(self, k: int) -> int:
        return min(self.depth or self.blocks_per_warp(k), self.blocks_per_warp(k))

    def fits(self, n: int, k: int) -> bool:
        return (self.warps in WARPS and k % QBLOCK == 0 and 1 <= self.split_k <= k // QBLOCK and n % 4 == 0
                and n >= 4 and 0 <= self.depth <= 4 and self.depth_for(k) <= 4 and self.blocks_per_warp(k) <= 16)


def default_shape(n: int, k: int) -> CudaShape:
    """One 64-element block per warp of 8 (nine 16-byte loads in flight per thread), so K splits into
    ``K / 512`` slices: 6 for K = 3072, 16 for K = 8192."""
    return CudaShape(warps=8, split_k=max(1, -(-(k // QBLOCK) // 8)))


def dot_asm(ptx: str) -> str:
    """The word-times-activations PTX of ``nf4_dot_asm`` (Triton's ``$n`` operands) as CUDA inline assembly
    (``%n``; its own registers' ``%`` doubled), one C string literal per line."""
    text = ptx.replace("%", "%%")
    text = re.sub(r"\$(\d)", r"%\1", text)
    return "\n".join(f'    "{line}\\n"' for line in text.splitlines())


@cache
def _launcher(ptx: str, f16: bool, k: int, shape: CudaShape, rank: int, lora_splits: int, has_res: bool,
              has_lora: bool, device: int) -> Any:
    """The compiled kernel for one configuration on one device (compiled on first use, kept)."""
    from persona_router.adapters.engine.cuda_rtc import kernel

    code = source(dot_asm(ptx), f16, k, shape, rank, lora_splits, has_res, has_lora)
    return kernel(code, KERNEL, f"cuda:{device}")


def source(asm: str, f16: bool, k: int, shape: CudaShape, rank: int, lora_splits: int, has_res: bool,
           has_lora: bool) -> str:
    """The kernel's C++ for one weight layout, launch shape and epilogue (each a compile-time constant)."""
    kb = k // QBLOCK
    per_split = -(-kb // shape.split_k)
    consts = {"WARPS": shape.warps, "SPLIT": shape.split_k, "KB": kb, "PER_SPLIT": per_split,
              "BPW": shape.blocks_per_warp(k), "DEPTH": shape.depth_for(k), "RANK": rank, "LSPLITS": lora_splits,
              "HAS_RES": int(has_res),
              "HAS_LORA": int(has_lora), "F16": int(f16)}
    defines = "\n".join(f"#define {name} {value}" for name, value in consts.items())
    return (_TEMPLATE.replace("/*DEFINES*/", defines).replace("/*DOT_ASM*/", asm)
            .replace("/*HALF*/", HALF_CONVERSIONS))


_TEMPLATE = r"""
/*DEFINES*/
#define ROWS 128

__device__ __forceinline__ float word_dot(unsigned w, uint4 x, unsigned t0, unsigned t1, unsigned t2, unsigned t3) {
  unsigned r;
  asm(
/*DOT_ASM*/
    : "=r"(r) : "r"(w), "r"(x.x), "r"(x.y), "r"(x.z), "r"(x.w), "r"(t0), "r"(t1), "r"(t2), "r"(t3));
  return __uint_as_float(r);
}

/*HALF*/
// Quantisation block i of this warp exists: inside this split's slice and inside K.
__device__ __forceinline__ bool block_ok(bool live, int warp, int i) {
  const int local = warp + i * WARPS;
  return live && local < PER_SPLIT && blockIdx.y * PER_SPLIT + local < KB;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) nf4_gemv_cuda(
    const uint4* __restrict__ words, const float4* __restrict__ scales, const uint4* __restrict__ x,
    const unsigned* __restrict__ table, unsigned short* __restrict__ out, const unsigned short* __restrict__ res,
    const float* __restrict__ t, const unsigned short* __restrict__ bt, const long long* __restrict__ slots,
    float* __restrict__ ws, unsigned* __restrict__ counters, int n, int t_stride, int bt_slot_stride,
    int bt_rank_stride) {
  __shared__ float partial[WARPS][ROWS];
  __shared__ float lora_t[RANK > 0 ? RANK : 1];
  __shared__ int last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n4 = n >> 2;
  const int quad = blockIdx.x * 32 + lane;
  const bool live = quad < n4;
  const int q = live ? quad : 0;
  const unsigned t0 = __ldg(table), t1 = __ldg(table + 1), t2 = __ldg(table + 2), t3 = __ldg(table + 3);

  // Loads run DEPTH quantisation blocks ahead of the arithmetic (DEPTH = BPW: every load first).
  uint4 wv[BPW][8];
  float4 sv[BPW];
  float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
  auto load = [&](int i) {
    const int kbs = block_ok(live, warp, i) ? blockIdx.y * PER_SPLIT + warp + i * WARPS : 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) wv[i][j] = __ldg(words + (size_t)(kbs * 8 + j) * n4 + q);
    sv[i] = __ldg(scales + (size_t)kbs * n4 + q);
  };
  auto dot = [&](int i) {
    if (!block_ok(live, warp, i)) return;
    const int kb = blockIdx.y * PER_SPLIT + warp + i * WARPS;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint4 xv = __ldg(x + kb * 8 + j);
      acc0 = fmaf(word_dot(wv[i][j].x, xv, t0, t1, t2, t3), sv[i].x, acc0);
      acc1 = fmaf(word_dot(wv[i][j].y, xv, t0, t1, t2, t3), sv[i].y, acc1);
      acc2 = fmaf(word_dot(wv[i][j].z, xv, t0, t1, t2, t3), sv[i].z, acc2);
      acc3 = fmaf(word_dot(wv[i][j].w, xv, t0, t1, t2, t3), sv[i].w, acc3);
    }
  };
#pragma unroll
  for (int i = 0; i < DEPTH; ++i) load(i);
#pragma unroll
  for (int i = 0; i < BPW; ++i) {
    if (i + DEPTH < BPW) load(i + DEPTH);
    dot(i);
  }
  *reinterpret_cast<float4*>(&partial[warp][lane * 4]) = make_float4(acc0, acc1, acc2, acc3);
  __syncthreads();
  const int row = blockIdx.x * ROWS + tid;
  const bool mine = tid < ROWS && row < n;
  float total = 0.f;
  if (mine) {
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += partial[w][tid];
  }
#if SPLIT > 1
  // Split K: partial rows to the workspace; the last block of this row range adds them in split order.
  if (mine) ws[(size_t)blockIdx.y * n + row] = total;
  __threadfence();
  __syncthreads();
  if (tid == 0) last = atomicAdd(counters + blockIdx.x, 1u) == SPLIT - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  total = 0.f;
  if (mine) {
#pragma unroll
    for (int s = 0; s < SPLIT; ++s) total += __ldcg(ws + (size_t)s * n + row);
  }
  if (tid == 0) atomicExch(counters + blockIdx.x, 0u);
#endif
#if HAS_LORA
  const long long slot = slots[0];
  if (slot > 0) {
    if (tid < RANK) {
      float v = 0.f;
      for (int s = 0; s < LSPLITS; ++s) v += t[s * t_stride + tid];
      lora_t[tid] = v;
    }
    __syncthreads();
    if (mine) {
      const unsigned short* b = bt + (size_t)(slot - 1) * bt_slot_stride + row;
      for (int r = 0; r < RANK; ++r) total = fmaf(lora_t[r], to_f32(b[(size_t)r * bt_rank_stride]), total);
    }
  }
#endif
  if (mine) {
#if HAS_RES
    total += to_f32(res[row]);
#endif
    out[row] = from_f32(total);
  }
}
"""


def gemv_cuda(x: Any, w: Any, *, residual: Any = None, lora: Any = None, shape: CudaShape | None = None,
              workspace: Any = None) -> Any:
    """``[residual +] x W^T [+ LoRA(x)]`` for one row ``x`` ([1, K]) on a CUDA GPU and a K-major copy ``w``
    (``nf4_gemv.KMajor``); ``lora`` is a ``LoraShrunk`` (``lora_kernels``) whose expand runs in the epilogue, as
    in ``nf4_gemv.gemv``."""
    import persona_router.adapters.engine.cuda_epilogue as cuda_epilogue
    import torch
    from persona_router.adapters.engine.nf4_kernels import _SHARED

    if x.device.type != "cuda" or not w.asm:
        raise ValueError("the CUDA GEMV runs on a CUDA device with the K-major copy's PTX (not Triton's interpreter)")
    if x.dim() != 2 or x.shape != (1, w.k):
        raise ValueError(f"x must be [1, {w.k}], got {tuple(x.shape)}")
    dtype = torch.float16 if w.f16 else torch.bfloat16
    if x.dtype != dtype:
        raise ValueError(f"x is {x.dtype}; this weight was laid out for {dtype}")
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.contiguous().clone()
    cuda_epilogue.check(w.n, dtype, residual, lora)
    t = shape or default_shape(w.n, w.k)
    if not t.fits(w.n, w.k):
        raise ValueError(f"launch shape {t} does not fit N={w.n}, K={w.k}")
    out = torch.empty(1, w.n, dtype=dtype, device=x.device)
    grid_n = -(-w.n // ROWS_PER_BLOCK)
    ws, counters = ((workspace or _SHARED).get(x.device, w.n, 1, t.split_k, grid_n, tag="cuda") if t.split_k > 1
                    else (out, out))
    launch = _launcher(w.asm, w.f16, w.k, t, *cuda_epilogue.variant(residual, lora),
                       cuda_epilogue.device_index(x.device))
    pointers, strides = cuda_epilogue.operands(out, residual, lora)
    launch(grid=(grid_n, t.split_k, 1), block=(32 * t.warps, 1, 1),
           args=[w.words, w.scales, x, w.table, out, *pointers, ws, counters, w.n, *strides])
    return out
