"""The engine's Triton kernels (CUDA; Triton's interpreter runs them on CPU for tests).

Kept in one module because Triton resolves a kernel's helper functions among its module's globals. The
module imports without Triton (every module must import on a CPU-only machine); ``require_triton`` says
what to install. Launchers, shapes and plain-torch references live in ``nf4_kernels``, ``lora_kernels`` and
``attention_kernels``.
"""

from __future__ import annotations

import sys
from typing import Any

from persona_router.core.errors import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:  # the engine's torch paths need no Triton; require_triton() names the install
    triton = None


def require_triton() -> Any:
    """This module, whose kernels are usable; ConfigError when Triton is missing."""
    if triton is None:
        raise ConfigError("the engine's fused GPU kernels need Triton: pip install triton", field="kernels")
    return sys.modules[__name__]


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def lora_epilogue(acc, rm, mask_m, rn, mask_n, t_ptr, bt_ptr, slot_ptr, stride_ts, stride_tm, stride_bs,
                      stride_br, R: tl.constexpr, SPLITS: tl.constexpr, RP: tl.constexpr):
        """``acc[m, n] += sum_r t[m, r] * Bt[slot_m - 1, r, n]`` for rows with an adapter (slot > 0).

        ``t`` holds ``SPLITS`` partial sums over K of the shrink (already times the row's scaling).
        """
        slot = tl.load(slot_ptr + rm, mask=mask_m, other=0)
        live = (slot > 0) & mask_m
        index = tl.where(live, slot - 1, 0)
        ranks = tl.arange(0, RP)
        rank_ok = ranks < R
        t = tl.zeros((acc.shape[0], RP), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            t += tl.load(t_ptr + s * stride_ts + rm[:, None] * stride_tm + ranks[None, :],
                         mask=live[:, None] & rank_ok[None, :], other=0.0)
        for r in tl.static_range(R):
            t_r = tl.sum(tl.where(ranks[None, :] == r, t, 0.0), axis=1)
            b = tl.load(bt_ptr + index[:, None] * stride_bs + r * stride_br + rn[None, :],
                        mask=live[:, None] & mask_n[None, :], other=0.0)
            acc += t_r[:, None] * b.to(tl.float32)
        return acc

    @triton.jit
    def lora_shrink(x_ptr, a_ptr, slot_ptr, scale_ptr, t_ptr, K, stride_xm, stride_as, stride_ar, stride_ts,
                    stride_tm, R: tl.constexpr, CHUNK: tl.constexpr, RP: tl.constexpr, BK: tl.constexpr):
        """``t[s, m, :] = scaling[slot_m] * x[m, chunk s] @ A[slot_m - 1, :, chunk s]^T`` (zeros for slot 0)."""
        m = tl.program_id(0)
        s = tl.program_id(1)
        slot = tl.load(slot_ptr + m)
        ranks = tl.arange(0, RP)
        rank_ok = ranks < R
        acc = tl.zeros((RP,), dtype=tl.float32)
        if slot > 0:
            for k0 in range(0, CHUNK, BK):
                kk = s * CHUNK + k0 + tl.arange(0, BK)
                k_ok = kk < K
                x = tl.load(x_ptr + m * stride_xm + kk, mask=k_ok, other=0.0).to(tl.float32)
                a = tl.load(a_ptr + (slot - 1) * stride_as + ranks[:, None] * stride_ar + kk[None, :],
                            mask=rank_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(a * x[None, :], axis=1)
            acc = acc * tl.load(scale_ptr + slot).to(tl.float32)
        tl.store(t_ptr + s * stride_ts + m * stride_tm + ranks, acc, mask=rank_ok)

    @triton.jit
    def lora_expand(out_ptr, t_ptr, bt_ptr, slot_ptr, M, N, stride_om, stride_ts, stride_tm, stride_bs, stride_br,
                    R: tl.constexpr, SPLITS: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """``out += LoRA`` in place, for base products that cuBLAS computed (dense weights)."""
        rm = tl.program_id(1) * BM + tl.arange(0, BM)
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        mask_m = rm < M
        mask_n = rn < N
        rm_safe = tl.where(mask_m, rm, 0)
        rn_safe = tl.where(mask_n, rn, 0)
        mask = mask_m[:, None] & mask_n[None, :]
        ptrs = out_ptr + rm_safe[:, None] * stride_om + rn_safe[None, :]
        acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        acc = lora_epilogue(acc, rm_safe, mask_m, rn_safe, mask_n, t_ptr, bt_ptr, slot_ptr, stride_ts, stride_tm,
                            stride_bs, stride_br, R, SPLITS, RP)
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def nf4_matmul(x_ptr, q_ptr, absq_ptr, abs2_ptr, off2_ptr, code2_ptr, code_ptr, out_ptr, res_ptr,
                   t_ptr, bt_ptr, slot_ptr, M, N, K: tl.constexpr, stride_xm, stride_om, stride_rm, stride_ts,
                   stride_tm, stride_bs, stride_br, R: tl.constexpr, BLOCK2: tl.constexpr, DOUBLE: tl.constexpr,
                   SPLITS: tl.constexpr, RP: tl.constexpr, HAS_RES: tl.constexpr, HAS_LORA: tl.constexpr,
                   BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr):
        """``out = [res +] x W^T [+ LoRA]`` with W unpacked from 4-bit codes in registers (see nf4_kernels)."""
        rm = tl.program_id(1) * BM + tl.arange(0, BM)
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        mask_m = rm < M
        mask_n = rn < N
        rn_safe = tl.where(mask_n, rn, 0)
        rm_safe = tl.where(mask_m, rm, 0)
        j = tl.arange(0, 32)
        half_k = K // 2
        blocks_per_row = K // 64
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        dtype = x_ptr.dtype.element_ty
        for step in range(0, tl.cdiv(K, BK)):
            for g in tl.static_range(BK // 64):
                kb = step * BK + g * 64
                qb = tl.load(q_ptr + rn_safe[:, None] * half_k + (kb // 2 + j)[None, :])
                blk = rn_safe * blocks_per_row + kb // 64
                if DOUBLE:
                    aq = tl.load(absq_ptr + blk).to(tl.int32)
                    scale = (tl.load(code2_ptr + aq) * tl.load(abs2_ptr + blk // BLOCK2)
                             + tl.load(off2_ptr + blk // BLOCK2))
                else:
                    scale = tl.load(absq_ptr + blk)
                w_hi = (tl.load(code_ptr + (qb >> 4).to(tl.int32)) * scale[:, None]).to(dtype)
                w_lo = (tl.load(code_ptr + (qb & 15).to(tl.int32)) * scale[:, None]).to(dtype)
                row = x_ptr + rm_safe[:, None] * stride_xm
                x_even = tl.load(row + (kb + 2 * j)[None, :], mask=mask_m[:, None], other=0.0)
                x_odd = tl.load(row + (kb + 2 * j + 1)[None, :], mask=mask_m[:, None], other=0.0)
                acc = tl.dot(x_even, tl.trans(w_hi), acc)
                acc = tl.dot(x_odd, tl.trans(w_lo), acc)
        if HAS_LORA:
            acc = lora_epilogue(acc, rm_safe, mask_m, rn_safe, mask_n, t_ptr, bt_ptr, slot_ptr, stride_ts, stride_tm,
                                stride_bs, stride_br, R, SPLITS, RP)
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RES:
            acc += tl.load(res_ptr + rm_safe[:, None] * stride_rm + rn_safe[None, :], mask=mask,
                           other=0.0).to(tl.float32)
        tl.store(out_ptr + rm_safe[:, None] * stride_om + rn_safe[None, :], acc.to(dtype), mask=mask)

    @triton.jit
    def decode_attention(q_ptr, k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, out_ptr, stride_qn, stride_qh,
                         stride_kn, stride_kh, stride_vn, stride_vh, stride_cb, stride_ch, stride_cl, stride_on,
                         stride_oh, scale, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BL: tl.constexpr,
                         NBLK: tl.constexpr, WINDOW: tl.constexpr):
        """One query token of row ``n``, head ``h`` over cache positions ``0..pos`` (``pos`` is the row's own).

        The new key and value (position ``pos``) come from registers and are written to the cache by the
        first query head of each KV group; blocks past ``pos`` are skipped, so a row reads only its live
        length. Online softmax in float32.
        """
        n = tl.program_id(0)
        h = tl.program_id(1)
        kv = h // GROUP
        pos = tl.load(pos_ptr + n)
        d = tl.arange(0, DP)
        d_ok = d < D
        q = tl.load(q_ptr + n * stride_qn + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32) * scale
        k_new = tl.load(k_new_ptr + n * stride_kn + kv * stride_kh + d, mask=d_ok, other=0.0)
        v_new = tl.load(v_new_ptr + n * stride_vn + kv * stride_vh + d, mask=d_ok, other=0.0)
        cache = n * stride_cb + kv * stride_ch
        if h % GROUP == 0:
            tl.store(k_cache_ptr + cache + pos * stride_cl + d, k_new, mask=d_ok)
            tl.store(v_cache_ptr + cache + pos * stride_cl + d, v_new, mask=d_ok)
        # The current position first: it is always visible, so the running max starts finite.
        m_i = tl.sum(q * k_new.to(tl.float32), axis=0)
        l_i = m_i * 0.0 + 1.0
        acc = v_new.to(tl.float32)
        lowest = pos - WINDOW + 1 if WINDOW > 0 else pos * 0
        for b in tl.static_range(NBLK):
            start = b * BL
            if (start < pos) & (start + BL > lowest):
                ll = start + tl.arange(0, BL)
                live = (ll < pos) & (ll >= lowest)
                offs = cache + ll[:, None] * stride_cl + d[None, :]
                both = live[:, None] & d_ok[None, :]
                k = tl.load(k_cache_ptr + offs, mask=both, other=0.0).to(tl.float32)
                scores = tl.where(live, tl.sum(k * q[None, :], axis=1), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, axis=0))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(scores - m_new)
                v = tl.load(v_cache_ptr + offs, mask=both, other=0.0).to(tl.float32)
                l_i = l_i * alpha + tl.sum(p, axis=0)
                acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
                m_i = m_new
        # acc started as v_new with weight exp(s_new - m) where m began at s_new: consistent with l_i.
        tl.store(out_ptr + n * stride_on + h * stride_oh + d, (acc / l_i).to(out_ptr.dtype.element_ty), mask=d_ok)
