"""A fused 4-bit matrix product: ``[residual +] x W^T [+ LoRA]`` reading bitsandbytes NF4 weights directly.

bitsandbytes stores a 4-bit ``[N, K]`` weight as ``N*K/2`` bytes (two codes per byte, the even element in the
high nibble), one quantised scale (``absmax``, uint8) per 64 consecutive elements and, with double
quantisation, one float32 scale and offset per 256 of those. Dequantising to a dense bf16 copy and calling
cuBLAS reads 4 bytes per weight per step (half a byte in, two out, two back in); this kernel reads the half
byte once and unpacks it in registers: ``w = code[nibble] * (code2[absmax_q] * absmax2 + offset)``, the same
arithmetic and rounding as ``bitsandbytes.functional.dequantize_4bit``, then a tensor-core product.

One kernel serves decode (a few rows: tiles of 16 rows and narrow column blocks, so the whole GPU streams
the weight) and prefill (many rows: wide tiles). Its epilogue adds the residual and the LoRA update of each
row's own adapter (see ``lora_kernels``), so a projection is one launch after the LoRA shrink.
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
    out = x.float() @ dequantize(w, x.dtype).float().T
    if lora is not None:
        out = out + lora.float()
    if residual is not None:
        out = out + residual.float()
    return out.to(x.dtype)


def _config(m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, warps, stages): narrow column blocks when few rows (bandwidth), wide tiles when many."""
    bk = next(b for b in (256, 128, 64) if k % b == 0)
    if m <= 16:
        return 16, (16 if n <= 4096 else 32), bk, 4, 3
    if m <= 64:
        return (32 if m <= 32 else 64), 32, bk, 4, 3
    return 64, 128, 64, 8, 3


def nf4_matmul(x: Any, w: Nf4Weight, *, residual: Any = None, lora: Any = None,
               config: tuple[int, int, int, int, int] | None = None) -> Any:
    """``[residual +] x W^T [+ LoRA(x)]`` for 2-D ``x`` ([M, K]); ``lora`` is a ``LoraShrunk`` (``lora_kernels``)."""
    import torch

    if x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"x must be [M, {w.k}], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    out = torch.empty(m, w.n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if residual is not None and (residual.stride(1) != 1 or tuple(residual.shape) != (m, w.n)):
        raise ValueError("residual must be a row-major [M, N] tensor")
    bm, bn, bk, warps, stages = config or _config(m, w.n, w.k)
    grid = ((w.n + bn - 1) // bn, (m + bm - 1) // bm)
    dummy = out
    t, bt, slots = (lora.t, lora.bt, lora.slot_ids) if lora is not None else (dummy, dummy, dummy)
    from persona_router.adapters.engine.triton_ops import require_triton

    require_triton().nf4_matmul[grid](
        x, w.packed, w.absmax_q, w.absmax2, w.offset2, w.code2, w.code, out,
        residual if residual is not None else dummy, t, bt, slots, m, w.n, w.k, x.stride(0), out.stride(0),
        residual.stride(0) if residual is not None else 0, t.stride(0) if lora is not None else 0,
        t.stride(1) if lora is not None else 0, bt.stride(0) if lora is not None else 0,
        bt.stride(1) if lora is not None else 0, lora.rank if lora is not None else 0,
        BLOCK2=w.block2, DOUBLE=w.double, SPLITS=lora.splits if lora is not None else 1,
        RP=lora.rank_pow2 if lora is not None else 1, HAS_RES=residual is not None, HAS_LORA=lora is not None,
        BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return out
