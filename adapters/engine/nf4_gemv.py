"""The one-row NF4 product (batch-1 decode) on a K-major copy of the 4-bit weight.

Why bitsandbytes' GEMV and the engine's earlier Triton GEMVs sit at about 0.85 TB/s on an H200 (the committed
profiles, ``benchmarks/results/serve_gpu_profile_round3_after_h200.md``): at one row every weight is used once,
so the kernel must decode 4-bit codes as fast as the memory delivers them, about 7.5e12 weights/s, against an
issue rate of about 33e12 thread instructions/s; a kernel may spend at most ~4 instructions per weight. bitsandbytes
reads its code table from shared memory once per weight and multiplies in 16-bit one weight at a time, with one
16-byte load per thread in flight. The row-major Triton GEMVs paid layout conversions through shared memory
on every step (the scales and the activations did not load in the layout of the words) and, with the table in
registers, re-made the table constants for every word.

This kernel (``gemv_triton.nf4_gemv_kmajor``) reads a copy of the weight made once at load, **K-major**: the
int32 words of eight codes as ``[K // 8, N]`` and one float32 scale per 64-element block as ``[K // 64, N]``.
Rows run along the fast axis of both, so a thread's 16-byte load holds one word of four consecutive rows, the
scales of those rows load the same way, and each activation pair it loads serves all four rows; no layout
conversion. The codes are decoded in registers by byte permutes and multiplied by packed 16-bit FMAs
(``nf4_dot_asm``): about 33 instructions per eight weights in the loop, by the compiler's own output.

Measured on an H200 (``benchmarks/results/kernels_gpu_round4b_h200.json``, graph-timed, L2-cold): 1.5-1.9x
bitsandbytes' GEMV per Phi-3-mini projection, 0.9-1.8 TB/s of the 4.2 TB/s copy bandwidth. Splitting K helps
most (30-45% per doubling up to 8): each loop step of a program waits a full memory latency, so latency and
instruction issue, not bytes, bound it; ``Shape.unroll`` (several steps' loads in flight) gained a few percent.
The residual and LoRA expand ride in the epilogue for every projection: over a layer that took 47.7 us against
53.0 for the GEMV followed by the expand kernel, though for ``down`` alone the separate expand was faster
(12.3 against 13.4 us; same file).

Memory: the copy holds ``N * K / 2`` bytes of codes and ``N * K / 16`` of float32 scales (0.56 bytes per
weight, 2.0 GB for Phi-3-mini's projections), beside the model's own 4-bit tensors; the scales replace the
decoded float32 scales bitsandbytes' GEMV path keeps, so the codes (1.8 GB) are the extra memory.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
QBLOCK = 64
# Measured launch shapes per GPU name and "NxK", written by ``benchmarks/kernels_gpu.py --write-shapes``.
SHAPES_FILE = Path(__file__).with_name("gemv_shapes.json")


@dataclass
class KMajor:
    """A 4-bit ``[N, K]`` weight laid out for ``gemv``: see the module docstring."""

    words: Any  # [K // 8, N] int32: word kw of row n holds elements 8 kw .. 8 kw + 7 (bitsandbytes' nibble order)
    scales: Any  # [K // 64, N] float32
    code: Any  # [16] float32: the 4-bit code (NF4 or FP4)
    table: Any  # [4] int32: the table words the PTX reads from registers (nf4_dot_asm.register_words)
    n: int
    k: int
    asm: str  # the PTX for this code and activation dtype ("" under Triton's interpreter)
    f16: bool  # float16 activations (else bfloat16)
    shape: Shape | None = None  # the launch shape, chosen at load for this GPU (None: default_shape's)
    unpack_asm: str = ""  # the lookup alone (nf4_dot_asm.unpack_ptx), for the many-row product (nf4_mma)
    kernel: str = "triton"  # the one-row kernel: "triton" (gemv_triton) or "cuda" (nf4_gemv_cuda, gemv="cuda")

    @property
    def nbytes(self) -> int:
        return self.words.numel() * 4 + self.scales.numel() * 4


def kmajor(packed: Any, absmax: Any, code: Any, n: int, k: int, dtype: Any, kernel: str = "triton"
           ) -> KMajor | None:
    """The K-major copy of a bitsandbytes 4-bit weight (``packed``: ``N * K / 2`` bytes in its order, ``absmax``:
    one float32 scale per 64 elements, already decoded from double quantisation), for activations of ``dtype``
    (bfloat16 or float16), read at one row by ``kernel`` ("triton" or "cuda"); None when K is not a multiple
    of 64 (or, for "cuda", N not a multiple of 4)."""
    import persona_router.adapters.engine.nf4_dot_asm as nf4_dot_asm
    import torch

    if kernel not in ("triton", "cuda"):
        raise ValueError(f"kernel must be 'triton' or 'cuda', got {kernel!r}")
    if k % QBLOCK or packed.numel() * 2 != n * k or absmax.numel() * QBLOCK != n * k or (kernel == "cuda" and n % 4):
        return None
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the 4-bit GEMV takes bfloat16 or float16 activations, not {dtype}")
    kind = "f16" if dtype == torch.float16 else "bf16"
    words = packed.contiguous().view(torch.uint8).reshape(n, k // 2).view(torch.int32).t().contiguous()
    scales = absmax.float().reshape(n, k // QBLOCK).t().contiguous()
    values = code.float().tolist()
    table = torch.tensor(nf4_dot_asm.register_words(values, kind), dtype=torch.int32, device=words.device)
    asm = "" if _interpreting() else nf4_dot_asm.ptx(values, kind, "bnb")
    unpack_asm = "" if _interpreting() else nf4_dot_asm.unpack_ptx(values, kind, "bnb")
    device = words.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return KMajor(words=words, scales=scales, code=code.float().to(device).contiguous(), table=table, n=n,
                  k=k, asm=asm, f16=kind == "f16", shape=measured_shape(name, n, k), unpack_asm=unpack_asm,
                  kernel=kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dequantize(w: KMajor) -> Any:
    """Plain-torch dense ``[N, K]`` float32 weight: the reference the kernel is tested against."""
    import torch

    words = w.words.t().contiguous().view(torch.uint8).reshape(w.n, w.k // 2).long()
    values = torch.stack([w.code[words >> 4], w.code[words & 15]], dim=-1).reshape(w.n, w.k)
    return values * w.scales.t().repeat_interleave(QBLOCK, dim=1)


def reference(x: Any, w: KMajor, residual: Any = None, lora: Any = None) -> Any:
    """``[residual +] x W^T [+ lora]`` in float32, one final rounding."""
    from persona_router.adapters.engine.nf4_kernels import reference_epilogue

    return reference_epilogue(x.float() @ dequantize(w).T, x.dtype, residual, lora)


@dataclass(frozen=True)
class Shape:
    """A launch shape: ``bn`` rows per program, ``bkw`` words of K per loop step, ``split_k`` programs per
    row block (the last one to finish adds the partial sums), ``prefetch`` the next step's loads before this
    step's arithmetic, ``maxnreg`` the register cap given to the compiler (without one it spends registers
    sparingly and re-makes the table constants for every word), ``unroll`` the steps unrolled (the compiler
    then issues several steps' loads before the first step's arithmetic), ``stages`` above 1 the software
    pipeline's depth (that many steps' loads in flight, through shared memory; instead of ``prefetch`` and
    ``unroll``). On an H200 the pipelined loop's best shape was 4-14% slower than the unrolled one for every
    Phi-3-mini projection (qkv 12.1 against 10.6 us; ``benchmarks/results/kernels_gpu_session7_h200.json``)."""

    bn: int = 64
    bkw: int = 16
    warps: int = 4
    split_k: int = 1
    prefetch: bool = False
    maxnreg: int | None = 80
    unroll: bool = False
    stages: int = 1

    def fits(self, n: int, k: int) -> bool:
        words = k // 8
        pipelined_alone = self.stages == 1 or not (self.prefetch or self.unroll)
        return (k % QBLOCK == 0 and 1 <= self.stages <= 8 and pipelined_alone and words % self.split_k == 0
                and (words // self.split_k) % self.bkw == 0 and self.bkw % 8 == 0 and self.split_k <= MAX_SPLIT
                and self.bn % 4 == 0 and n >= 1)


MAX_SPLIT = 32


@cache
def _measured() -> dict[str, dict[str, list[Any]]]:
    if not SHAPES_FILE.exists():
        return {}
    return dict(json.loads(SHAPES_FILE.read_text()))


def measured_shape(device_name: str, n: int, k: int) -> Shape | None:
    """The fastest launch shape measured for this GPU and weight shape (``SHAPES_FILE``), or None."""
    entry = _measured().get(device_name, {}).get(f"{n}x{k}")
    if entry is None:
        return None
    shape = Shape(*entry)
    if not shape.fits(n, k):
        log.warning("measured GEMV shape %s does not fit %dx%d; using the default", shape, n, k)
        return None
    return shape


def default_shape(n: int, k: int) -> Shape:
    """Where no shape was measured: enough programs to keep an H200's 132 multiprocessors streaming (split K
    until there are at least 512 programs)."""
    bn = 64
    programs = -(-n // bn)
    for split in (1, 2, 4, 8):
        shape = Shape(bn=bn, bkw=16, split_k=split)
        if programs * split >= 512 and shape.fits(n, k):
            return shape
    for split in (8, 4, 2, 1):
        for bkw in (16, 8):
            shape = Shape(bn=bn, bkw=bkw, split_k=split)
            if shape.fits(n, k):
                return shape
    raise ValueError(f"no launch shape of the 4-bit GEMV fits K={k} (needs a multiple of 64)")


def gemv(x: Any, w: KMajor, *, residual: Any = None, lora: Any = None, shape: Shape | None = None,
         workspace: Any = None) -> Any:
    """``[residual +] x W^T [+ LoRA(x)]`` for one row ``x`` ([1, K]); ``lora`` is a ``LoraShrunk``
    (``lora_kernels``), added with ``residual`` in the kernel's epilogue. A copy made for the CUDA kernel runs
    it (``nf4_gemv_cuda``; ``shape`` then is its ``CudaShape`` or None)."""
    import torch

    if w.kernel == "cuda":
        from persona_router.adapters.engine.nf4_gemv_cuda import gemv_cuda

        return gemv_cuda(x, w, residual=residual, lora=lora, shape=shape, workspace=workspace)  # type: ignore[arg-type]
    from persona_router.adapters.engine.nf4_kernels import _SHARED
    from persona_router.adapters.engine.triton_ops import require_triton

    require_triton()
    import persona_router.adapters.engine.gemv_triton as gemv_triton

    if x.dim() != 2 or x.shape != (1, w.k):
        raise ValueError(f"x must be [1, {w.k}], got {tuple(x.shape)}")
    if x.dtype != (torch.float16 if w.f16 else torch.bfloat16):
        raise ValueError(f"x is {x.dtype}; this weight was laid out for {'float16' if w.f16 else 'bfloat16'}")
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.contiguous().clone()
    if residual is not None and (residual.stride(1) != 1 or tuple(residual.shape) != (1, w.n)):
        raise ValueError("residual must be a row-major [1, N] tensor")
    t = shape or w.shape or default_shape(w.n, w.k)
    if not t.fits(w.n, w.k):
        raise ValueError(f"launch shape {t} does not fit N={w.n}, K={w.k}")
    out = torch.empty(1, w.n, dtype=x.dtype, device=x.device)
    grid_n = -(-w.n // t.bn)
    ws, counters = ((workspace or _SHARED).get(x.device, w.n, 1, t.split_k, grid_n) if t.split_k > 1
                    else (out, out))
    has_lora = lora is not None
    tl_t, tl_bt, slots = (lora.t, lora.bt, lora.slot_ids) if has_lora else (out, out, out)
    options = {} if t.maxnreg is None or _interpreting() else {"maxnreg": t.maxnreg}
    gemv_triton.nf4_gemv_kmajor[(grid_n, t.split_k)](
        x.view(torch.int32), w.words, w.scales, w.code, w.table, out,
        residual if residual is not None else out, tl_t, tl_bt, slots, ws, counters, w.n, w.k, out.stride(0),
        residual.stride(0) if residual is not None else 0,
        tl_t.stride(0) if has_lora else 0, tl_t.stride(1) if has_lora else 0,
        tl_bt.stride(0) if has_lora else 0, tl_bt.stride(1) if has_lora else 0,
        R=lora.rank if has_lora else 0, SPLITS=lora.splits if has_lora else 1,
        RP=lora.rank_pow2 if has_lora else 1, HAS_RES=residual is not None, HAS_LORA=has_lora, BN=t.bn,
        BKW=t.bkw, SPLIT_K=t.split_k, PREFETCH=t.prefetch, EVEN_N=w.n % t.bn == 0, F16=w.f16, ASM=w.asm,
        UNROLL=t.unroll and not t.prefetch, STAGES=t.stages, num_warps=t.warps, **options)
    return out
