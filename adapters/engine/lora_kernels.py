"""Batched multi-adapter LoRA in the style of Punica's BGMV: each row gathers its own adapter by slot.

``shrink`` computes ``t[m] = scaling[slot_m] * x[m] @ A[slot_m]^T`` (rank-sized, float32) with one program
per (row, K chunk); the expand ``y[m] += t[m] @ Bt[slot_m]`` runs in the epilogue of the base product
(``nf4_kernels``) or, after a cuBLAS product, as ``expand_`` in place. Rows with slot 0 (no adapter) read
no adapter weights and add exact zeros. Unlike a one-hot mask over all resident slots, the work per row is
one adapter's, whatever the number of adapters in the batch.

Storage is the ``LoraBank``'s: ``A`` is ``[capacity, R, in]``, ``Bt`` is ``[capacity, R, out]`` with slot
``s`` at index ``s - 1``, ``scaling`` is indexed by slot id (slot 0 scales by zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class LoraShrunk:
    """The shrink's output for one projection, what the expand reads."""

    t: Any  # [splits, M, rank_pow2] float32 partial sums over K chunks
    bt: Any  # [capacity, R, N]
    slot_ids: Any  # [M] int64
    rank: int
    rank_pow2: int
    splits: int


def _pow2(n: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return size


def splits_for(rows: int) -> int:
    """K chunks per row: enough programs to stream A quickly at decode, one chunk for prefill."""
    return 16 if rows <= 4 else 4 if rows <= 32 else 1


def shrink(x: Any, a: Any, bt: Any, slot_ids: Any, scaling: Any) -> LoraShrunk:
    """Per-row down-projection ``x[m] @ A[slot_m]^T * scaling[slot_m]`` for ``x`` [M, K]."""
    import torch
    from persona_router.adapters.engine.triton_ops import require_triton

    m, k = x.shape
    rank = a.shape[1]
    rank_pow2 = _pow2(rank)
    splits = splits_for(m)
    block_k = 64
    per_split = -(-k // splits)
    chunk = -(-per_split // block_k) * block_k
    t = torch.empty(splits, m, rank_pow2, dtype=torch.float32, device=x.device)
    if x.stride(1) != 1:
        x = x.contiguous()
    require_triton().lora_shrink[(m, splits)](
        x, a, slot_ids, scaling, t, k, x.stride(0), a.stride(0), a.stride(1), t.stride(0), t.stride(1), rank,
        CHUNK=chunk, RP=rank_pow2, BK=block_k, num_warps=4)
    return LoraShrunk(t=t, bt=bt, slot_ids=slot_ids, rank=rank, rank_pow2=rank_pow2, splits=splits)


def expand_(out: Any, lora: LoraShrunk) -> Any:
    """``out += t @ Bt[slot]`` in place for a row-major [M, N] ``out``; returns ``out``."""
    from persona_router.adapters.engine.triton_ops import require_triton

    m, n = out.shape
    if out.stride(1) != 1:
        raise ValueError("out must be row-major")
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 64 if m <= 64 else 128
    grid = ((n + bn - 1) // bn, (m + bm - 1) // bm)
    require_triton().lora_expand[grid](
        out, lora.t, lora.bt, lora.slot_ids, m, n, out.stride(0), lora.t.stride(0), lora.t.stride(1),
        lora.bt.stride(0), lora.bt.stride(1), lora.rank, SPLITS=lora.splits, RP=lora.rank_pow2, BM=bm, BN=bn,
        num_warps=4)
    return out


def reference(x: Any, a: Any, bt: Any, slot_ids: Any, scaling: Any) -> Any:
    """Plain-torch float32 ``(x @ A[slot]^T) @ Bt[slot] * scaling[slot]`` per row (zeros for slot 0)."""
    import torch

    index = (slot_ids - 1).clamp(min=0)
    t = torch.einsum("mk,mrk->mr", x.float(), a[index].float())
    y = torch.einsum("mr,mrn->mn", t, bt[index].float())
    return y * scaling[slot_ids].float().unsqueeze(-1) * (slot_ids > 0).unsqueeze(-1)
