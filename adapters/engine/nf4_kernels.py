"""A fused 4-bit matrix product: ``[residual +] x W^T [+ LoRA]`` reading bitsandbytes NF4 weights directly.

bitsandbytes stores a 4-bit ``[N, K]`` weight as ``N*K/2`` bytes (two codes per byte, the even element in the
high nibble), one quantised scale (``absmax``, uint8) per 64 consecutive elements and, with double
quantisation, one float32 scale and offset per 256 of those. Dequantising to a dense bf16 copy and calling
cuBLAS reads 4 bytes per weight per step (half a byte in, two out, two back in); this kernel reads the half
byte once and unpacks it in registers: ``w = code[nibble] * (code2[absmax_q] * absmax2 + offset)``, the same
arithmetic and rounding as ``bitsandbytes.functional.dequantize_4bit``, then a tensor-core product.

Two kernels (``triton_ops``), chosen by row count (``default_tiles``). ``nf4_gemv`` (one row, batch-1 decode)
runs on CUDA cores: each program owns a few output features, reads the packed weight as 16-byte vectors of
int32 words, looks each nibble up in the 16-entry code table (one cache line, L1-resident), multiplies by the
activation and scales each word's sum by its block's absmax; no tensor-core tile, so no layout conversion.
``nf4_dot`` (several rows, decode of many streams and prefill) unpacks each 64-element block of its weight
rows into a bf16 tile and multiplies on the tensor cores. Both split K over several programs when the output
alone gives too few programs to keep every multiprocessor streaming (the last program of a tile to finish
adds the partial sums in a fixed order: deterministic), and both add the residual and the LoRA update of each
row's own adapter (see ``lora_kernels``) in their epilogue, so a projection is one launch after the LoRA shrink.
The kernel itself is in ``triton_ops``; ``nf4_weight`` and ``reference_matmul`` work on any device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
QBLOCK = 64  # elements per absmax (bitsandbytes' default 4-bit block size; the only one the kernel reads)


@dataclass
class Nf4Weight:
    """The tensors of one (possibly fused) 4-bit ``[N, K]`` weight, as bitsandbytes stores them, no copy."""

    packed: Any  # [N, K // 2] uint8
    absmax_q: Any  # [N * K // 64] uint8 (double-quantised) or float32
    absmax2: Any  # [N * K // 64 // block2] float32 (ones when not double-quantised)
    offset2: Any  # [same] float32: the offset of the part each second-level block belongs to
    code2: Any  # [256] float32 second-level code (identity when not double-quantised)
    code: Any  # [16] float32 4-bit code (NF4 or FP4)
    n: int
    k: int
    block2: int
    double: bool

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax_q, self.absmax2, self.offset2))


def nf4_weight(modules: list[Any]) -> Nf4Weight | None:
    """The fused-kernel view of bitsandbytes 4-bit modules stacked along N, or None when unsupported."""
    import torch

    states = [m.weight.quant_state for m in modules]
    k = int(states[0].shape[1])
    if any(int(s.shape[1]) != k or s.blocksize != QBLOCK for s in states) or k % QBLOCK:
        return None
    if any(getattr(s, "packing_format_for_cpu", False) for s in states):
        return None
    double = states[0].state2 is not None
    if any((s.state2 is not None) != double for s in states):
        return None
    if double:
        block2 = int(states[0].state2.blocksize)
        if any(int(s.state2.blocksize) != block2 or not torch.equal(s.state2.code, states[0].state2.code)
               for s in states):
            return None
        # Parts concatenate along N only when each part's scales fill whole second-level blocks.
        if len(states) > 1 and any((int(s.shape[0]) * k // QBLOCK) % block2 for s in states):
            return None
    if any(not torch.equal(s.code, states[0].code) for s in states):
        return None
    packed = [m.weight.data.reshape(int(s.shape[0]), k // 2) for m, s in zip(modules, states, strict=True)]
    device = packed[0].device
    if double:
        absmax_q = [s.absmax.reshape(-1) for s in states]
        absmax2 = [s.state2.absmax.reshape(-1).float() for s in states]
        offset2 = [torch.full_like(a2, float(s.offset)) for a2, s in zip(absmax2, states, strict=True)]
        code2 = states[0].state2.code.float().to(device)
    else:
        block2 = 1 << 30  # one "second-level block" spans everything: scale 1, offset 0
        absmax_q = [s.absmax.reshape(-1).float() for s in states]
        absmax2 = [torch.ones(1, device=device)]
        offset2 = [torch.zeros(1, device=device)]
        code2 = torch.zeros(1, device=device)

    def cat(parts: list[Any]) -> Any:
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    n = sum(int(s.shape[0]) for s in states)
    return Nf4Weight(packed=cat(packed), absmax_q=cat(absmax_q), absmax2=cat(absmax2) if double else absmax2[0],
                     offset2=cat(offset2) if double else offset2[0], code2=code2,
                     code=states[0].code.float().to(device), n=n, k=k, block2=block2, double=double)


def dequantize(w: Nf4Weight, dtype: Any) -> Any:
    """Plain-torch dense ``[N, K]`` weight: the reference the kernel is tested against."""
    import torch

    blocks = torch.arange(w.absmax_q.numel(), device=w.packed.device)
    if w.double:
        absmax = w.code2[w.absmax_q.long()] * w.absmax2[blocks // w.block2] + w.offset2[blocks // w.block2]
    else:
        absmax = w.absmax_q.float()
    flat = w.packed.reshape(-1)
    values = torch.stack([w.code[(flat >> 4).long()], w.code[(flat & 15).long()]], dim=1).reshape(-1)
    return (values * absmax.repeat_interleave(QBLOCK)).to(dtype).reshape(w.n, w.k)


def reference_matmul(x: Any, w: Nf4Weight, residual: Any = None, lora: Any = None) -> Any:
    """``[residual +] x W^T [+ lora]`` in float32 with one final rounding (what the kernel computes)."""
    return reference_epilogue(x.float() @ dequantize(w, x.dtype).float().T, x.dtype, residual, lora)


def reference_epilogue(product: Any, dtype: Any, residual: Any = None, lora: Any = None) -> Any:
    """The kernels' epilogue in float32 (``product [+ lora] [+ residual]``), rounded once to ``dtype``."""
    out = product
    if lora is not None:
        out = out + lora.float()
    if residual is not None:
        out = out + residual.float()
    return out.to(dtype)


@dataclass(frozen=True)
class Tiles:
    """A launch shape. ``gemv`` (one row, CUDA cores): ``bn`` features per program, ``inner`` int32 words of
    K per loop step. ``dot`` (tensor cores): ``bm x bn`` output tiles, ``inner`` 64-element blocks per loop
    step. ``split_k`` programs share one tile's K range (the last one to finish adds the partial sums)."""

    kind: str
    bm: int
    bn: int
    inner: int
    warps: int
    stages: int = 1
    split_k: int = 1
    xvec: bool = False  # gemv: the activations in one vector load per step, split in registers


def default_tiles(m: int, n: int, k: int) -> Tiles:
    """Enough programs to keep every multiprocessor streaming the weight: split K when N alone gives few."""
    blocks = k // 64
    if m == 1:
        programs = -(-n // 8)
        split = 1 if programs >= 1024 else min(8, max(1, 1024 // programs), k // 1024 or 1)
        words = k // 8
        inner = next((b for b in (128, 64, 32) if words % split == 0 and (words // split) % b == 0), 128)
        return Tiles("gemv", 1, 8, inner, 4, split_k=split)
    if m <= 16:
        bm, bn, inner, warps, target = 16, 32, 2, 4, 528
    elif m <= 64:
        bm, bn, inner, warps, target = (32 if m <= 32 else 64), 64, 2, 4, 264
    else:
        bm, bn, inner, warps, target = 128, 128, 1, 8, 264
    programs = -(-n // bn) * -(-m // bm)
    split = 1 if programs >= target else min(8, -(-target // programs), max(1, blocks // (2 * inner)))
    return Tiles("dot", bm, bn, inner, warps, 3, split)


def precision(dtype: Any) -> str:
    """Tensor-core input precision: float32 activations get true float32 products (not TF32)."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


class Workspace:
    """Split-K partial sums and per-tile arrival counters, one pair per launch shape, reused by every launch
    of that shape and never freed (a captured CUDA graph keeps their addresses).

    Launches that share a workspace must not run concurrently (the engine's steps run one at a time on one
    stream); each ``ModelRunner`` owns one. Counters return to zero at the end of every launch, so CUDA graph
    replays find them as the capture did."""

    MAX_SPLIT = 8

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str, int, int, int, int], tuple[Any, Any]] = {}
        self._scratch: dict[tuple[str, Any], Any] = {}

    def scratch(self, device: Any, numel: int, dtype: Any) -> Any:
        """A flat buffer of at least ``numel`` elements, one per device and dtype, grown (never shrunk) on demand:
        the dense weight of one wide product at a time (``nf4_mma``)."""
        import torch

        key = (str(device), dtype)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._scratch[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]

    def get(self, device: Any, n: int, rows: int, split: int, tiles: int, tag: str = "") -> tuple[Any, Any]:
        """``split * rows * n`` float32 partials and ``tiles`` zeroed counters; ``tag`` keeps one kernel's
        buffers apart from another's of the same sizes."""
        import torch

        key = (tag, str(device), n, rows, split, tiles)
        if key not in self._buffers:
            self._buffers[key] = (torch.empty(split * rows * n, dtype=torch.float32, device=device),
                                  torch.zeros(tiles, dtype=torch.int32, device=device))
        return self._buffers[key]


_SHARED = Workspace()


def decoded(w: Nf4Weight) -> Nf4Weight:
    """The same weight with its double-quantised scales decoded once to float32 (4 bytes per 64 weights, 0.2 GB
    for Phi-3-mini): the kernel then reads one scale per block instead of decoding it from two tables."""
    import torch

    if not w.double:
        return w
    blocks = torch.arange(w.absmax_q.numel(), device=w.packed.device)
    absmax = (w.code2[w.absmax_q.long()] * w.absmax2[blocks // w.block2] + w.offset2[blocks // w.block2]).float()
    one = torch.ones(1, device=w.packed.device)
    return Nf4Weight(packed=w.packed, absmax_q=absmax.contiguous(), absmax2=one, offset2=one * 0,
                     code2=one * 0, code=w.code, n=w.n, k=w.k, block2=1 << 30, double=False)


def lut_tiles(n: int, k: int) -> Tiles | None:
    """The one-row launch shape for the register-lookup GEMV (``nf4_lut``), or None when K does not split into
    whole loop steps (that kernel path has no masked tail)."""
    t = default_tiles(1, n, k)
    words = k // 8
    if k % 64 or words % t.split_k:
        return None
    inner = next((b for b in (128, 64, 32, 16, 8) if (words // t.split_k) % b == 0), None)
    return None if inner is None else Tiles("gemv", 1, t.bn, inner, t.warps, t.stages, t.split_k, xvec=True)


def product_operands(x: Any, k: int, n: int, residual: Any) -> tuple[Any, Any]:
    """A 4-bit product's checked operands: ``x`` ([M, K]) with unit column stride and an empty ``[M, N]`` output;
    ``residual`` must be a row-major ``[M, N]`` tensor (or None)."""
    import torch

    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if residual is not None and (residual.stride(1) != 1 or tuple(residual.shape) != (x.shape[0], n)):
        raise ValueError(f"residual must be a row-major [{x.shape[0]}, {n}] tensor, got shape "
                         f"{tuple(residual.shape)} strides {residual.stride()}")
    return x, torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)


def nf4_matmul(x: Any, w: Nf4Weight, *, residual: Any = None, lora: Any = None, tiles: Tiles | None = None,
               workspace: Workspace | None = None, lut: str = "") -> Any:
    """``[residual +] x W^T [+ LoRA(x)]`` for 2-D ``x`` ([M, K]); ``lora`` is a ``LoraShrunk`` (``lora_kernels``).

    ``workspace`` holds split-K scratch (default: one per process; pass your own when launches of two threads
    could overlap). ``lut``: ``nf4_lut.ptx(code)``, one row only: the codes are decoded by register permutes
    (tiles from ``lut_tiles``)."""
    import torch

    x, out = product_operands(x, w.k, w.n, residual)
    m = x.shape[0]
    if m == 0:
        return out
    t = tiles or (lut_tiles(w.n, w.k) if lut else None) or default_tiles(m, w.n, w.k)
    if t.kind == "gemv" and m != 1:
        raise ValueError("the gemv kernel takes one row")
    if lut and (t.kind != "gemv" or not t.xvec or w.k % 64 or (w.k // 8) % t.split_k
                or (w.k // 8 // t.split_k) % t.inner):
        raise ValueError("the register-lookup GEMV takes one row, xvec tiles and whole loop steps (see lut_tiles)")
    split = max(1, t.split_k)
    if split > Workspace.MAX_SPLIT:
        raise ValueError(f"split-K takes at most {Workspace.MAX_SPLIT} splits")
    grid_n, grid_m = -(-w.n // t.bn), -(-m // t.bm)
    ws, counters = ((workspace or _SHARED).get(x.device, w.n, m, split, grid_n * grid_m) if split > 1
                    else (out, out))
    from persona_router.adapters.engine.triton_ops import require_triton

    ops = require_triton()
    has_lora = lora is not None
    tl_t, tl_bt, slots = (lora.t, lora.bt, lora.slot_ids) if has_lora else (out, out, out)
    lora_args = (tl_t.stride(0) if has_lora else 0, tl_t.stride(1) if has_lora else 0,
                 tl_bt.stride(0) if has_lora else 0, tl_bt.stride(1) if has_lora else 0,
                 lora.rank if has_lora else 0)
    flags = {"BLOCK2": w.block2, "DOUBLE": w.double, "SPLITS": lora.splits if has_lora else 1,
             "RP": lora.rank_pow2 if has_lora else 1, "HAS_RES": residual is not None, "HAS_LORA": has_lora,
             "SPLIT_K": split, "num_warps": t.warps}
    res = residual if residual is not None else out
    res_stride = residual.stride(0) if residual is not None else 0
    common = (w.absmax_q, w.absmax2, w.offset2, w.code2, w.code, out, res, tl_t, tl_bt, slots, ws, counters)
    if t.kind == "gemv":
        ops.nf4_gemv[(grid_n, split)](
            x, w.packed.view(torch.int32), *common, w.n, w.k, out.stride(0), res_stride, *lora_args,
            BN=t.bn, BKW=t.inner, XVEC=t.xvec, LUT=lut, **flags)
    else:
        ops.nf4_dot[(grid_n, grid_m, split)](
            x, w.packed, *common, m, w.n, w.k, x.stride(0), out.stride(0), res_stride, *lora_args,
            BM=t.bm, BN=t.bn, G=t.inner, num_stages=t.stages, PRECISION=precision(x.dtype), **flags)
    return out
