"""Batched multi-adapter LoRA in the style of Punica's BGMV: each row gathers its own adapter by slot.

``shrink`` computes ``t[m] = scaling[slot_m] * x[m] @ A[slot_m]^T`` (rank-sized, float32); the expand
``y[m] += t[m] @ Bt[slot_m]`` runs in the epilogue of the base product (``nf4_kernels``, ``nf4_gemv``,
``nf4_mma``) or, after a cuBLAS product, as ``expand_`` in place. Up to ``GATHER_ROWS`` rows each program
serves one row (and one K chunk), so the work per row is one adapter's whatever the number of adapters in the
batch, and rows with slot 0 read no adapter weights. Past that, both halves work over the step's slots
``1..m``: the shrink as one tensor-core product keeping each row's own columns, the expand as one cuBLAS
product over the stacked ``Bt`` (``_expand_dense``); rows with slot 0 still add exact zeros.

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
    h: Any = None  # the product's input: ``x``, or what the shrink's prologue computed from it
    slots: int | None = None  # the highest slot id the step may hold (the shrink's ``m``; None: the bank's capacity)


def _pow2(n: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return size


GATHER_ROWS = 8  # up to this many rows each row gathers its own A (BGMV); more share one tensor-core product


def tiling_for(rows: int) -> tuple[int, int]:
    """(rows per program, K chunks) of the many-row (tensor-core) shrink: 16-row tiles up to 128 rows, 64 beyond
    (long prefills), and enough K chunks for about 128 programs, at most 32. Every program that computes the
    norm prologue reads its rows in full for their sum of squares, and one that computes the gated activation
    reads two inputs per column: many narrow programs spread that work. On an H200 at 16-64 rows (Phi-3-mini's
    K, graph-timed, ``benchmarks/results/kernels_gpu_prologue_h200.json``) 16 x 32 ran the norm shrink in 7.0 us
    and the gated one in 8.3, against 15.3-16.1 and 47.2-47.6 for the first rule's 64 x 8."""
    block_m = 16 if rows <= 128 else 64
    blocks = -(-rows // block_m)
    return block_m, max(1, min(32, -(-128 // blocks)))


def gather_chunk(k: int) -> int:
    """Columns of K per program of the few-row shrink: a power of two (one masked load step, no loop), about
    K / 16 so that a one-row step still runs a dozen programs, at most 512 (the A slice stays in registers)."""
    return max(64, min(512, _pow2(-(-k // 16))))


@dataclass(frozen=True)
class Prologue:
    """What the shrink computes from its input before the product, and stores for the base product to read:
    ``norm`` (RMSNorm with ``weight`` and ``eps``, the layer's input norm) or ``silu_mul`` (``up * silu(gate)``
    of ``[gate | up]``, the gated MLP's activation)."""

    kind: str
    weight: Any = None
    eps: float = 0.0

    @property
    def code(self) -> int:
        return {"norm": 1, "silu_mul": 2}[self.kind]


def shrink(x: Any, a: Any, bt: Any, slot_ids: Any, scaling: Any, m: int | None = None,
           prologue: Prologue | None = None, norm_block: int | None = None,
           tiling: tuple[int, int] | None = None) -> LoraShrunk:
    """Per-row down-projection ``h[m] @ A[slot_m]^T * scaling[slot_m]`` for ``x`` [M, K], where ``h`` is ``x``
    or, with a ``prologue``, its norm or gated activation (returned as ``LoraShrunk.h``).

    ``m`` is the highest slot id present (the step's slot bucket; default: the bank's capacity): many rows
    are multiplied by the A of slots ``1..m`` at once and keep their own slot's columns. ``norm_block``: columns
    per step of the norm's sum of squares (default: the whole row in one step for few rows; one dependent
    load per step, so narrow steps make a long chain of memory latencies). ``tiling``: (rows per program, K chunks)
    for more than ``GATHER_ROWS`` rows (default ``tiling_for``; rows per program 16, 32 or 64)."""
    import torch
    from persona_router.adapters.engine.nf4_kernels import precision
    from persona_router.adapters.engine.triton_ops import require_triton

    if x.stride(1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    k = a.shape[2]
    width = 2 * k if prologue is not None and prologue.kind == "silu_mul" else k
    if x.shape[1] != width:
        raise ValueError(f"x must be [M, {width}], got {tuple(x.shape)}")
    h = torch.empty(rows, k, dtype=x.dtype, device=x.device) if prologue is not None else x
    pro = prologue.code if prologue is not None else 0
    norm_weight = prologue.weight if prologue is not None and prologue.weight is not None else x
    eps = prologue.eps if prologue is not None else 0.0
    rank = a.shape[1]
    ops = require_triton()
    if rows <= GATHER_ROWS:  # each program: one row, one K chunk in one load step (a short chain of loads)
        chunk = block_k = gather_chunk(k)
        splits = -(-k // chunk)
        rank_pow2 = _pow2(rank)
        t = torch.empty(splits, rows, rank_pow2, dtype=torch.float32, device=x.device)
        ops.lora_shrink[(rows, splits)](
            x, a, slot_ids, scaling, t, h, norm_weight, eps, k, x.stride(0), h.stride(0), a.stride(0), a.stride(1),
            t.stride(0), t.stride(1), rank, CHUNK=chunk, RP=rank_pow2, BK=block_k, PRO=pro,
            RB=norm_block or _pow2(k), num_warps=4)
        return LoraShrunk(t=t, bt=bt, slot_ids=slot_ids, rank=rank, rank_pow2=rank_pow2, splits=splits, h=h,
                          slots=_present(m, a))
    block_m, splits = tiling or tiling_for(rows)
    if block_m not in (16, 32, 64) or splits < 1:
        raise ValueError(f"tiling must be (16, 32 or 64 rows, at least 1 chunk), got {tiling}")
    block_k = 64
    per_split = -(-k // splits)
    chunk = -(-per_split // block_k) * block_k
    present = _present(m, a)
    slots = _pow2(present)
    rank_pow2 = max(16, _pow2(rank))  # a tensor-core tile is at least 16 wide
    t = torch.empty(splits, rows, rank_pow2, dtype=torch.float32, device=x.device)
    ops.lora_shrink_dot[(-(-rows // block_m), splits)](
        x, a, slot_ids, scaling, t, h, norm_weight, eps, rows, k, present, x.stride(0), h.stride(0), a.stride(0),
        a.stride(1), t.stride(0), t.stride(1), R=rank, RP=rank_pow2, S=slots, CHUNK=chunk, BM=block_m, BK=block_k,
        PRECISION=precision(x.dtype), PRO=pro, RB=norm_block or max(64, 8192 // block_m), num_warps=4)
    return LoraShrunk(t=t, bt=bt, slot_ids=slot_ids, rank=rank, rank_pow2=rank_pow2, splits=splits, h=h,
                      slots=present)


def _present(m: int | None, a: Any) -> int:
    """Slots ``1..present`` exist in ``a``: the step's slot bucket ``m``, at most the bank's capacity."""
    return max(1, min(m if m is not None else a.shape[0], a.shape[0]))


def expand_(out: Any, lora: LoraShrunk, residual: Any = None, block_n: int | None = None) -> Any:
    """``out += t @ Bt[slot] [+ residual]`` in place for a row-major [M, N] ``out``; returns ``out``.
    ``block_n``: output columns per program for few rows (default by size)."""
    from persona_router.adapters.engine.triton_ops import require_triton

    ops = require_triton()
    m, n = out.shape
    if out.stride(1) != 1:
        raise ValueError("out must be row-major")
    if residual is not None and (residual.stride(1) != 1 or tuple(residual.shape) != (m, n)):
        raise ValueError("residual must be a row-major [M, N] tensor")
    res = residual if residual is not None else out
    if m <= GATHER_ROWS:  # one program per (row, column block), the whole rank in one load
        bn = block_n or (64 if m * n <= 16384 else 128)
        ops.lora_expand_rows[(m, -(-n // bn))](
            out, res, lora.t, lora.bt, lora.slot_ids, n, out.stride(0), res.stride(0), lora.t.stride(0),
            lora.t.stride(1), lora.bt.stride(0), lora.bt.stride(1), lora.rank, SPLITS=lora.splits,
            SP=_pow2(lora.splits), RP=lora.rank_pow2, BN=bn, HAS_RES=residual is not None, num_warps=4)
        return out
    return _expand_dense(out, lora, residual)


def _expand_dense(out: Any, lora: LoraShrunk, residual: Any) -> Any:
    """Many rows: each row's rank-sized sums laid into its own slot's columns of a ``[M, slots x R]`` matrix
    (zeros elsewhere, one small kernel; the sums rounded to ``out``'s dtype, as the bank's products round theirs),
    then the residual added and cuBLAS's in-place ``addmm_`` with the bank's stacked ``Bt``.
    On an H200 (K = 3072, N = 9216, rank 16, graph-timed) shrink and expand took 7.6 us at 64 rows and 8.2 at
    128 (``benchmarks/results/kernels_gpu_lora_dense_h200.json``) against 30.9 for the shrink and a Triton expand that
    gathered each row's ``Bt`` (``kernels_gpu_lora_session7_h200.json``; the shrink alone 3.4): every row re-read
    its adapter's ``[R, N]`` slice, where one product reads each resident slot's once. A Triton product in place of
    ``addmm_`` (residual included, one rounding) was 4.4 against 4.6 us alone at 64 rows, but the 64-row decode step
    replayed in 6.31 against 6.20 ms (``serve_gpu_profile_triton_expand_h200.md``): a wash, so the library product
    stays."""
    import persona_router.adapters.engine.lora_dense_triton as lora_dense_triton
    import torch

    m = out.shape[0]
    slots = lora.slots or lora.bt.shape[0]
    width = slots * lora.rank
    dense = torch.empty(m, width, dtype=out.dtype, device=out.device)
    block = min(_pow2(width), 256)
    lora_dense_triton.lora_dense_t[(m, -(-width // block))](
        lora.t, lora.slot_ids, dense, width, lora.t.stride(0), lora.t.stride(1), dense.stride(0), R=lora.rank,
        SPLITS=lora.splits, BW=block, num_warps=1)
    if residual is not None:
        out.add_(residual)
    return out.addmm_(dense, lora.bt[:slots].reshape(width, -1).to(out.dtype))


def reference(x: Any, a: Any, bt: Any, slot_ids: Any, scaling: Any) -> Any:
    """Plain-torch float32 ``(x @ A[slot]^T) @ Bt[slot] * scaling[slot]`` per row (zeros for slot 0)."""
    import torch

    index = (slot_ids - 1).clamp(min=0)
    t = torch.einsum("mk,mrk->mr", x.float(), a[index].float())
    y = torch.einsum("mr,mrn->mn", t, bt[index].float())
    return y * scaling[slot_ids].float().unsqueeze(-1) * (slot_ids > 0).unsqueeze(-1)
