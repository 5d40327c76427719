"""A slow, obviously correct packed causal attention: one SDPA call per example, for checking the fast path."""

from __future__ import annotations

import itertools
from typing import Any


def reference_packed_kernel(q: Any, k: Any, v: Any, cu_seqlens: Any, max_len: int, scale: float, left: int) -> Any:
    """Same contract as ``training.cuda_kernels`` kernels: (T, H, D) tensors, example boundaries ``cu_seqlens``."""
    import torch

    assert left == -1, "the reference has no sliding window"
    bounds = [int(x) for x in cu_seqlens.tolist()]
    assert bounds[0] == 0 and bounds[-1] == q.shape[0]
    assert max_len == max(b - a for a, b in itertools.pairwise(bounds))
    outs = []
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def packed_batch(lengths: list[int], vocab: int, *, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """A padding-free batch as TRL's collator builds it: one row, restarting positions, example boundaries."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    input_ids = torch.randint(3, vocab, (1, total), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device),
            "cu_seq_lens_q": cu.to(device), "cu_seq_lens_k": cu.to(device),
            "max_length_q": max(lengths), "max_length_k": max(lengths)}


def traceable_packed_kernel(q: Any, k: Any, v: Any, cu_seqlens: Any, max_len: int, scale: float, left: int) -> Any:
    """The same function without host reads, so that Dynamo traces it with the lengths symbolic.

    Each token attends causally within its example: example ids come from the boundaries on the device, and one
    SDPA call runs over the block-diagonal causal mask. ``max_len`` is an upper bound, as for FlashAttention.
    """
    import torch

    assert left == -1, "the reference has no sliding window"
    positions = torch.arange(q.shape[0], device=q.device)
    example = torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)
    allowed = (example[:, None] == example[None, :]) & (positions[:, None] >= positions[None, :])
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           attn_mask=allowed, scale=scale)
    return out.transpose(0, 1)
