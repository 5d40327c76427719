"""Decode attention over the static KV cache that reads only each row's live length.

The torch path attends every row over the first ``kv_len`` cache positions (the batch's longest, rounded up)
with an additive mask, so a batch of short and long requests reads the long one's length for every row.
``decode_attention`` runs one Triton program per (row, query head): it writes the step's new key and value
into the cache, then reads positions ``0..pos`` of its own row only (``pos`` = the row's position), with an
online softmax in float32. The kernel is in ``triton_ops``; ``reference`` is the plain-torch definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BLOCK = 64  # cache positions per loop step (default)


@dataclass(frozen=True)
class Launch:
    """The kernel's launch shape: ``block`` cache positions per step, ``warps`` per program, and ``guard``:
    skip the blocks past a row's position with a branch (True) or run every block with masked loads (False,
    no branch, so the compiler may issue all blocks' loads before the first one's arithmetic). ``split``: one
    program per ``block`` positions of each (row, head), merged by the last to finish (``decode_attention_split``)
    instead of one program looping over the blocks."""

    block: int = BLOCK
    warps: int = 4
    guard: bool = True
    split: bool = False


SPLIT_ROWS = 4  # up to this many rows the split form runs 4 warps per program; more rows, 1 warp (see launch_for)
SPLIT_BLOCK = 32  # cache positions per program of the split form
ONE_WARP_POSITIONS = 256  # the longest attended length the 1-warp form was measured at


def launch_for(rows: int, kv_len: int = ONE_WARP_POSITIONS) -> Launch:
    """The launch shape for a step of ``rows`` rows: the cache positions split over programs, 32 per program,
    merged by the last to finish (flash-decoding). On an H200 at 160 live positions of a 256-position cache
    (``benchmarks/results/kernels_gpu_session7_h200.json``, graph-timed, 36 launch shapes per row count): 1 row
    5.8 us with 4 warps (the one-program-per-(row, head) loop took 9.2 in round 4); 8 rows 7.5 us with 1 warp
    against 11.5 for that loop; 32 rows 29.6 against 37.0; 64 rows 53.6 against 68.6 (2.4 TB/s of live keys and
    values; SDPA over the masked cache took 65.5). With one program per (row, head) and few rows, the programs run
    their blocks one after another, each a full memory latency; splitting gives every block its own program,
    and from 8 rows on a warp per 32-position block keeps more programs resident. ``kv_len``: the step's attended
    length; past ``ONE_WARP_POSITIONS`` (not measured) 4 warps, since the last program merges one partial state per
    block and a single warp would hold them all in registers."""
    one_warp = rows > SPLIT_ROWS and kv_len <= ONE_WARP_POSITIONS
    return Launch(block=SPLIT_BLOCK, warps=1 if one_warp else 4, split=True)


def decode_attention(q: Any, k_new: Any, v_new: Any, k_cache: Any, v_cache: Any, positions: Any, kv_len: int,
                     window: int | None = None, rotary: tuple[Any, Any] | None = None,
                     launch: Launch | None = None, workspace: Any = None) -> Any:
    """``q`` [n, heads, dim], ``k_new``/``v_new`` [n, kv_heads, dim] (any strides, last dim contiguous),
    caches [rows, kv_heads, cache_len, dim]; returns [n, heads, dim]. Row ``i`` attends ``0..positions[i]``
    (all positions below ``kv_len``), after writing ``k_new[i]``/``v_new[i]`` at ``positions[i]``.

    ``rotary = (cos, sin)`` (each ``[positions, rotary_dim]``, contiguous): ``q`` and ``k_new`` are given
    before the rotary embedding and the kernel applies it at each row's position. ``launch``: the kernel's
    launch shape (default ``launch_for(n)``). ``workspace`` (``nf4_kernels.Workspace``, default one per process)
    holds the split form's partial states; launches sharing one must not overlap."""
    import torch
    from persona_router.adapters.engine.triton_ops import require_triton

    n, heads, dim = q.shape
    kv_heads = k_new.shape[1]
    if heads % kv_heads or k_cache.stride(3) != 1 or q.stride(2) != 1 or k_new.stride(2) != 1 or v_new.stride(2) != 1:
        raise ValueError("decode_attention wants whole query groups per KV head and a contiguous head dim")
    out = torch.empty(n, heads, dim, dtype=q.dtype, device=q.device)
    shape = launch or launch_for(n, kv_len)
    nblk = -(-kv_len // shape.block)
    cos, sin = rotary if rotary is not None else (out, out)
    if rotary is not None and (cos.stride(1) != 1 or cos.stride(0) != cos.shape[1] or sin.stride() != cos.stride()):
        raise ValueError("rotary tables must be contiguous [positions, rotary_dim]")
    require_triton()
    import persona_router.adapters.engine.triton_attention as triton_attention

    dp = 1 << (dim - 1).bit_length()
    if shape.split:
        from persona_router.adapters.engine.nf4_kernels import _SHARED

        # One buffer for every step of a cache: sized for all its rows and positions, so steps of other lengths or
        # row counts use a prefix of it (the kernel lays states out by its own rows and splits) instead of each
        # adding a buffer of their own for the life of the process.
        rows_cap = max(n, int(k_cache.shape[0]))
        most_blocks = -(-int(k_cache.shape[2]) // shape.block)
        ws, counters = (workspace or _SHARED).get(q.device, heads * (dp + 2), rows_cap, most_blocks, rows_cap * heads,
                                                  tag="attention")
        triton_attention.decode_attention_split[(n, heads, nblk)](
            q, k_new, v_new, k_cache, v_cache, positions, out, cos, sin, ws, counters, n, q.stride(0), q.stride(1),
            k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), out.stride(0), out.stride(1), 1.0 / math.sqrt(dim), HEADS=heads,
            GROUP=heads // kv_heads, D=dim, DP=dp, BL=shape.block, NSPLIT=nblk, NSP=1 << (nblk - 1).bit_length(),
            WINDOW=window or 0, ROT=int(cos.shape[1]) if rotary is not None else 0, num_warps=shape.warps)
        return out
    triton_attention.decode_attention[(n, heads)](
        q, k_new, v_new, k_cache, v_cache, positions, out, cos, sin, q.stride(0), q.stride(1), k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0), v_new.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0),
        out.stride(1), 1.0 / math.sqrt(dim), GROUP=heads // kv_heads, D=dim, DP=1 << (dim - 1).bit_length(),
        BL=shape.block, NBLK=nblk, WINDOW=window or 0, ROT=int(cos.shape[1]) if rotary is not None else 0,
        GUARD=shape.guard, num_warps=shape.warps)
    return out


def reference(q: Any, k_new: Any, v_new: Any, k_cache: Any, v_cache: Any, positions: Any,
              window: int | None = None, rotary: tuple[Any, Any] | None = None) -> Any:
    """Plain torch, float32: rotate (the engine's eager ``rotate``, when ``rotary`` is given), write the new keys
    and values into (copies of) the caches, attend ``0..pos`` per row."""
    import torch

    if rotary is not None:
        from persona_router.adapters.engine.kernels import rotate

        cos, sin = (table[positions].unsqueeze(1) for table in rotary)
        q, k_new = rotate(q, cos, sin), rotate(k_new, cos, sin)

    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    n, heads, dim = q.shape
    group = heads // k_new.shape[1]
    rows = torch.arange(n, device=q.device)
    k_cache[rows, :, positions] = k_new
    v_cache[rows, :, positions] = v_new
    out = torch.empty(n, heads, dim, dtype=torch.float32, device=q.device)
    for i in range(n):
        pos = int(positions[i])
        lo = max(0, pos - window + 1) if window else 0
        keys = k_cache[i, :, lo:pos + 1].float().repeat_interleave(group, dim=0)  # [heads, L, dim]
        values = v_cache[i, :, lo:pos + 1].float().repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,hld->hl", q[i].float(), keys) / math.sqrt(dim)
        out[i] = torch.einsum("hl,hld->hd", scores.softmax(-1), values)
    return out.to(q.dtype), k_cache, v_cache
