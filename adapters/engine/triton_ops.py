"""The engine's Triton kernels for products and LoRA (CUDA; Triton's interpreter runs them on CPU for tests).

Kept in one module because Triton resolves a kernel's helper functions among its module's globals (decode
attention, with its own helpers, is in ``triton_attention``). The module imports without Triton (every module
must import on a CPU-only machine); ``require_triton`` says what to install. Launchers, shapes and plain-torch
references live in ``nf4_kernels``, ``lora_kernels`` and ``attention_kernels``.
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
    def row_rstd(x_ptr, rm, mask_m, stride_xm, K: tl.constexpr, eps, BM: tl.constexpr, BK: tl.constexpr):
        """``1 / sqrt(mean(x^2) + eps)`` of each row, in float32 (RMSNorm's scale, as Hugging Face computes it)."""
        ss = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & (kk < K)[None, :],
                        other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=1)
        return tl.rsqrt(ss / K + eps)

    @triton.jit
    def prologue(x_ptr, rm, mask_m, kk, k_ok, stride_xm, h_ptr, stride_hm, nw_ptr, rstd, K, PRO: tl.constexpr):
        """The shrink's input on columns ``kk``: ``x`` itself (``PRO`` 0), ``RMSNorm(x)`` (1), or
        ``up * silu(gate)`` of ``x = [gate | up]`` (2), rounded where the eager model rounds; for ``PRO > 0`` it is
        also stored to ``h``, where the base product reads it (so the norm or activation is not a kernel)."""
        mask = mask_m[:, None] & k_ok[None, :]
        ptrs = x_ptr + rm[:, None] * stride_xm + kk[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0)
        if PRO == 2:
            gate = x.to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(x.dtype).to(tl.float32)
            up = tl.load(ptrs + K, mask=mask, other=0.0)
            h = (up.to(tl.float32) * act).to(x.dtype)
        elif PRO == 1:
            nw = tl.load(nw_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            h = (nw[None, :] * (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32)).to(x.dtype)
        else:
            h = x
        if PRO > 0:
            tl.store(h_ptr + rm[:, None] * stride_hm + kk[None, :], h, mask=mask)
        return h

    @triton.jit
    def lora_shrink(x_ptr, a_ptr, slot_ptr, scale_ptr, t_ptr, h_ptr, nw_ptr, eps, K: tl.constexpr, stride_xm,
                    stride_hm, stride_as, stride_ar, stride_ts, stride_tm, R: tl.constexpr, CHUNK: tl.constexpr,
                    RP: tl.constexpr, BK: tl.constexpr, PRO: tl.constexpr, RB: tl.constexpr):
        """``t[s, m, :] = scaling[slot_m] * h[m, chunk s] @ A[slot_m - 1, :, chunk s]^T`` (zeros for slot 0),
        ``h`` the prologue's output (see ``prologue``)."""
        m = tl.program_id(0)
        s = tl.program_id(1)
        slot = tl.load(slot_ptr + m)
        live = slot > 0
        rm = m + tl.arange(0, 1)
        mask_m = rm >= 0
        ranks = tl.arange(0, RP)
        rank_ok = ranks < R
        rstd = tl.zeros((1,), dtype=tl.float32)
        if PRO == 1:
            rstd = row_rstd(x_ptr, rm, mask_m, stride_xm, K, eps, 1, RB)
        acc = tl.zeros((RP,), dtype=tl.float32)
        for k0 in range(0, CHUNK, BK):
            kk = s * CHUNK + k0 + tl.arange(0, BK)
            k_ok = kk < K
            h = prologue(x_ptr, rm, mask_m, kk, k_ok, stride_xm, h_ptr, stride_hm, nw_ptr, rstd, K, PRO)
            a = tl.load(a_ptr + (slot - 1) * stride_as + ranks[:, None] * stride_ar + kk[None, :],
                        mask=rank_ok[:, None] & k_ok[None, :] & live, other=0.0).to(tl.float32)
            acc += tl.sum(a * h.to(tl.float32), axis=1)
        acc = tl.where(live, acc * tl.load(scale_ptr + slot).to(tl.float32), 0.0)
        tl.store(t_ptr + s * stride_ts + m * stride_tm + ranks, acc, mask=rank_ok)

    @triton.jit
    def lora_shrink_dot(x_ptr, a_ptr, slot_ptr, scale_ptr, t_ptr, h_ptr, nw_ptr, eps, M, K: tl.constexpr, NS,
                        stride_xm, stride_hm, stride_as, stride_ar, stride_ts, stride_tm, R: tl.constexpr,
                        RP: tl.constexpr, S: tl.constexpr, CHUNK: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                        PRECISION: tl.constexpr, PRO: tl.constexpr, RB: tl.constexpr):
        """The shrink for many rows (Punica's SGMV role): ``BM`` rows' inputs times the A of every slot
        ``1..S`` on the tensor cores (``S * RP`` columns, slot-major), then each row keeps only its own slot's
        columns, selected (never multiplied), so another slot's inf or NaN cannot reach it."""
        pid_m = tl.program_id(0)
        s = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        mask_m = rm < M
        rm_safe = tl.where(mask_m, rm, 0)
        cols = tl.arange(0, S * RP)
        c_slot = cols // RP
        c_rank = cols % RP
        col_ok = (c_rank < R) & (c_slot < NS)
        rstd = tl.zeros((BM,), dtype=tl.float32)
        if PRO == 1:
            rstd = row_rstd(x_ptr, rm_safe, mask_m, stride_xm, K, eps, BM, RB)
        acc = tl.zeros((BM, S * RP), dtype=tl.float32)
        for i in range(0, CHUNK, BK):  # chunks tile K; columns past K are masked
            kk = s * CHUNK + i + tl.arange(0, BK)
            k_ok = kk < K
            h = prologue(x_ptr, rm_safe, mask_m, kk, k_ok, stride_xm, h_ptr, stride_hm, nw_ptr, rstd, K, PRO)
            a = tl.load(a_ptr + c_slot[:, None] * stride_as + c_rank[:, None] * stride_ar + kk[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(h, tl.trans(a), acc, input_precision=PRECISION)
        slot = tl.load(slot_ptr + rm_safe, mask=mask_m, other=0)
        own = (c_slot[None, :] == (slot - 1)[:, None]) & (slot > 0)[:, None]
        t = tl.sum(tl.reshape(tl.where(own, acc, 0.0), (BM, S, RP)), axis=1)
        t = t * tl.load(scale_ptr + slot).to(tl.float32)[:, None]
        tl.store(t_ptr + s * stride_ts + rm_safe[:, None] * stride_tm + tl.arange(0, RP)[None, :], t,
                 mask=mask_m[:, None])

    @triton.jit
    def lora_expand_rows(out_ptr, res_ptr, t_ptr, bt_ptr, slot_ptr, N, stride_om, stride_rm, stride_ts, stride_tm,
                         stride_bs, stride_br, R: tl.constexpr, SPLITS: tl.constexpr, SP: tl.constexpr,
                         RP: tl.constexpr, BN: tl.constexpr, HAS_RES: tl.constexpr):
        """``out += LoRA [+ residual]`` in place for few rows: one program per (row, ``BN`` columns) reads its
        row's partial sums and its adapter's whole ``[R, BN]`` slice of ``Bt`` in one step each (no row tile
        padded to 16, no loop over the rank): a short chain of loads, which is what bounds a one-row step."""
        m = tl.program_id(0)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        mask_n = rn < N
        slot = tl.load(slot_ptr + m)
        live = slot > 0
        index = tl.where(live, slot - 1, 0)
        ranks = tl.arange(0, RP)
        rank_ok = ranks < R
        parts = tl.arange(0, SP)
        t = tl.load(t_ptr + parts[:, None] * stride_ts + m * stride_tm + ranks[None, :],
                    mask=(parts < SPLITS)[:, None] & rank_ok[None, :] & live, other=0.0)
        t = tl.sum(t, axis=0)  # [RP]: the shrink's partial sums over K chunks (already times the scaling)
        b = tl.load(bt_ptr + index * stride_bs + ranks[:, None] * stride_br + rn[None, :],
                    mask=rank_ok[:, None] & mask_n[None, :] & live, other=0.0).to(tl.float32)
        ptrs = out_ptr + m * stride_om + rn
        acc = tl.load(ptrs, mask=mask_n, other=0.0).to(tl.float32) + tl.sum(t[:, None] * b, axis=0)
        if HAS_RES:
            acc += tl.load(res_ptr + m * stride_rm + rn, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def store_out(acc, rm, mask_m, rn, mask_n, out_ptr, res_ptr, t_ptr, bt_ptr, slot_ptr, stride_om, stride_rm,
                  stride_ts, stride_tm, stride_bs, stride_br, R: tl.constexpr, SPLITS: tl.constexpr, RP: tl.constexpr,
                  HAS_RES: tl.constexpr, HAS_LORA: tl.constexpr):
        """The shared epilogue: ``out = acc [+ LoRA expand] [+ residual]``, rounded once."""
        if HAS_LORA:
            acc = lora_epilogue(acc, rm, mask_m, rn, mask_n, t_ptr, bt_ptr, slot_ptr, stride_ts, stride_tm,
                                stride_bs, stride_br, R, SPLITS, RP)
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RES:
            acc += tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def split_k_finish(acc, rm, mask_m, rn, mask_n, ws_ptr, cnt_ptr, tile, split, M, N, SPLIT_K: tl.constexpr):
        """Split-K without atomics on the data: every program stores its partial tile in the workspace
        (``[SPLIT_K, M, N]`` float32); the last of a tile's programs to arrive (counted atomically) sums them
        in a fixed order (deterministic), resets the counter for the next launch and returns ``(sum, True)``."""
        mask = mask_m[:, None] & mask_n[None, :]
        tl.store(ws_ptr + split * M * N + rm[:, None] * N + rn[None, :], acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the count says so
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        last = arrived == SPLIT_K - 1
        total = tl.zeros(acc.shape, dtype=tl.float32)
        if last:
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + s * M * N + rm[:, None] * N + rn[None, :], mask=mask, other=0.0,
                                 cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
        return total, last

    @triton.jit
    def finish_tile(acc, rm, mask_m, rn, mask_n, tile, split, M, N, out_ptr, res_ptr, t_ptr, bt_ptr, slot_ptr, ws_ptr,
                    cnt_ptr, stride_om, stride_rm, stride_ts, stride_tm, stride_bs, stride_br, R: tl.constexpr,
                    SPLITS: tl.constexpr, RP: tl.constexpr, HAS_RES: tl.constexpr, HAS_LORA: tl.constexpr,
                    SPLIT_K: tl.constexpr):
        """The end of every split-K product: the shared epilogue at once, or by the last of the tile's programs
        once ``split_k_finish`` has added the partial sums."""
        if SPLIT_K == 1:
            store_out(acc, rm, mask_m, rn, mask_n, out_ptr, res_ptr, t_ptr, bt_ptr, slot_ptr, stride_om, stride_rm,
                      stride_ts, stride_tm, stride_bs, stride_br, R, SPLITS, RP, HAS_RES, HAS_LORA)
        else:
            total, last = split_k_finish(acc, rm, mask_m, rn, mask_n, ws_ptr, cnt_ptr, tile, split, M, N, SPLIT_K)
            if last:
                store_out(total, rm, mask_m, rn, mask_n, out_ptr, res_ptr, t_ptr, bt_ptr, slot_ptr, stride_om,
                          stride_rm, stride_ts, stride_tm, stride_bs, stride_br, R, SPLITS, RP, HAS_RES, HAS_LORA)

    @triton.jit
    def finish_row(acc, rn, mask_n, pid_n, split, N, out_ptr, res_ptr, t_ptr, bt_ptr, slot_ptr, ws_ptr, cnt_ptr,
                   stride_om, stride_rm, stride_ts, stride_tm, stride_bs, stride_br, R: tl.constexpr,
                   SPLITS: tl.constexpr, RP: tl.constexpr, HAS_RES: tl.constexpr, HAS_LORA: tl.constexpr,
                   SPLIT_K: tl.constexpr):
        """The one-row GEMVs' ending: the ``[BN, steps]`` partial products summed to the row ``[1, BN]``, then
        ``finish_tile`` (one tile per program column)."""
        total = tl.sum(acc, axis=1)[None, :]
        rm = tl.arange(0, 1)
        finish_tile(total, rm, rm < 1, rn, mask_n, pid_n, split, 1, N, out_ptr, res_ptr, t_ptr, bt_ptr, slot_ptr,
                    ws_ptr, cnt_ptr, stride_om, stride_rm, stride_ts, stride_tm, stride_bs, stride_br, R, SPLITS, RP,
                    HAS_RES, HAS_LORA, SPLIT_K)

    @triton.jit
    def nf4_gemv(x_ptr, q_ptr, absq_ptr, abs2_ptr, off2_ptr, code2_ptr, code_ptr, out_ptr, res_ptr, t_ptr, bt_ptr,
                 slot_ptr, ws_ptr, cnt_ptr, N, K: tl.constexpr, stride_om, stride_rm, stride_ts, stride_tm,
                 stride_bs, stride_br, R: tl.constexpr, BLOCK2: tl.constexpr, DOUBLE: tl.constexpr,
                 SPLITS: tl.constexpr, RP: tl.constexpr, HAS_RES: tl.constexpr, HAS_LORA: tl.constexpr,
                 BN: tl.constexpr, BKW: tl.constexpr, SPLIT_K: tl.constexpr, XVEC: tl.constexpr,
                 LUT: tl.constexpr = ""):
        """One row: ``out = [res +] x W^T [+ LoRA]`` on CUDA cores, no tensor-core tile, no layout conversion.

        ``q_ptr`` is the packed weight viewed as int32 words ``[N, K // 8]``: a word holds 8 consecutive
        elements (byte ``b`` holds elements ``2b`` in its high and ``2b + 1`` in its low nibble, little-endian
        bytes), so element ``e`` of a word sits at bit ``8 * (e // 2) + 4 * (1 - e % 2)``. Each program owns
        ``BN`` output features and one of ``SPLIT_K`` slices of K; per word it looks up 8 codes in the 16-entry
        table (one cache line: stays in L1), multiplies by the 8 activations, and scales the word's sum by its
        64-element block's absmax (double quantisation decoded in place); partial sums stay element-wise in
        registers until the end of the loop. ``LUT``: inline PTX that decodes a word's eight codes in registers
        (``nf4_lut``) instead of eight table loads; it needs ``XVEC`` and whole loop steps.
        """
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        mask_n = rn < N
        rn_safe = tl.where(mask_n, rn, 0)
        WORDS: tl.constexpr = K // 8
        PER_SPLIT: tl.constexpr = (WORDS + SPLIT_K - 1) // SPLIT_K
        acc = tl.zeros((BN, BKW), dtype=tl.float32)
        row = q_ptr + rn_safe[:, None] * WORDS
        # Unmasked (vectorised) loads when every split is a whole number of loop steps.
        EVEN: tl.constexpr = (WORDS % SPLIT_K == 0) and (PER_SPLIT % BKW == 0)
        for i in range(0, PER_SPLIT, BKW):  # constant trip count (past WORDS: masked)
            k0 = split * PER_SPLIT + i
            kw = k0 + tl.arange(0, BKW)
            kw_ok = (kw < split * PER_SPLIT + PER_SPLIT) & (kw < WORDS)
            if EVEN:
                words = tl.load(row + kw[None, :])
            else:
                words = tl.load(row + kw[None, :], mask=kw_ok[None, :], other=0)
            blk = rn_safe[:, None] * (K // 64) + kw[None, :] // 8
            if DOUBLE:
                aq = tl.load(absq_ptr + blk, mask=kw_ok[None, :], other=0).to(tl.int32)
                scale = (tl.load(code2_ptr + aq) * tl.load(abs2_ptr + blk // BLOCK2)
                         + tl.load(off2_ptr + blk // BLOCK2))
            else:
                scale = tl.load(absq_ptr + blk, mask=kw_ok[None, :], other=0.0)
            part = tl.zeros((BN, BKW), dtype=tl.float32)
            if XVEC and EVEN:
                # The step's activations in one vector load, split into the 8 element positions of a word
                # (position e = 4 * b2 + 2 * b1 + b0; each split takes the lowest remaining bit).
                xs = tl.load(x_ptr + k0 * 8 + tl.arange(0, BKW * 8)).to(tl.float32).reshape(BKW, 2, 2, 2)
                b0_0, b0_1 = tl.split(xs)
                b1_00, b1_01 = tl.split(b0_0)
                b1_10, b1_11 = tl.split(b0_1)
                x0, x4 = tl.split(b1_00)
                x2, x6 = tl.split(b1_01)
                x1, x5 = tl.split(b1_10)
                x3, x7 = tl.split(b1_11)
                xv = (x0, x1, x2, x3, x4, x5, x6, x7)
                if LUT != "":
                    vals = tl.inline_asm_elementwise(
                        LUT, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words],
                        dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32,
                               tl.float32), is_pure=True, pack=1)
                    for e in tl.static_range(8):
                        part += vals[e] * xv[e][None, :]
                else:
                    for e in tl.static_range(8):
                        nib = (words >> (8 * (e // 2) + 4 * (1 - e % 2))) & 15
                        part += tl.load(code_ptr + nib) * xv[e][None, :]
            else:
                for e in tl.static_range(8):
                    nib = (words >> (8 * (e // 2) + 4 * (1 - e % 2))) & 15
                    xe = tl.load(x_ptr + kw * 8 + e, mask=kw_ok, other=0.0).to(tl.float32)
                    part += tl.load(code_ptr + nib) * xe[None, :]
            acc += part * scale
        finish_row(acc, rn_safe, mask_n, pid_n, split, N, out_ptr, res_ptr, t_ptr, bt_ptr, slot_ptr, ws_ptr, cnt_ptr,
                   stride_om, stride_rm, stride_ts, stride_tm, stride_bs, stride_br, R, SPLITS, RP, HAS_RES, HAS_LORA,
                   SPLIT_K)

    @triton.jit
    def nf4_dot(x_ptr, q_ptr, absq_ptr, abs2_ptr, off2_ptr, code2_ptr, code_ptr, out_ptr, res_ptr, t_ptr, bt_ptr,
                slot_ptr, ws_ptr, cnt_ptr, M, N, K: tl.constexpr, stride_xm, stride_om, stride_rm, stride_ts,
                stride_tm, stride_bs, stride_br, R: tl.constexpr, BLOCK2: tl.constexpr, DOUBLE: tl.constexpr,
                SPLITS: tl.constexpr, RP: tl.constexpr, HAS_RES: tl.constexpr, HAS_LORA: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr):
        """Many rows: each 64-element block of ``BN`` weight rows is unpacked once into a bf16 tile (both nibbles
        of a byte joined in K order, scaled by the block's absmax) and multiplied by the ``BM`` rows' activations
        on the tensor cores, ``G`` blocks per loop step."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        split = tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mask_m = rm < M
        mask_n = rn < N
        rn_safe = tl.where(mask_n, rn, 0)
        rm_safe = tl.where(mask_m, rm, 0)
        hb = tl.arange(0, 32)
        kk = tl.arange(0, 64)
        BLOCKS: tl.constexpr = K // 64
        PER_SPLIT: tl.constexpr = (BLOCKS + SPLIT_K - 1) // SPLIT_K
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        dtype = x_ptr.dtype.element_ty
        xrow = x_ptr + rm_safe[:, None] * stride_xm
        for i in range(0, PER_SPLIT, G):  # constant trip count (past BLOCKS: masked)
            b0 = split * PER_SPLIT + i
            for g in tl.static_range(G):
                b = b0 + g
                ok = (b < split * PER_SPLIT + PER_SPLIT) & (b < BLOCKS)
                packed = tl.load(q_ptr + rn_safe[:, None] * (K // 2) + (b * 32 + hb)[None, :],
                                 mask=ok, other=0).to(tl.int32)
                blk = rn_safe * BLOCKS + b
                if DOUBLE:
                    aq = tl.load(absq_ptr + blk, mask=ok, other=0).to(tl.int32)
                    scale = (tl.load(code2_ptr + aq) * tl.load(abs2_ptr + blk // BLOCK2)
                             + tl.load(off2_ptr + blk // BLOCK2))
                else:
                    scale = tl.load(absq_ptr + blk, mask=ok, other=0.0)
                w = tl.join(tl.load(code_ptr + (packed >> 4)), tl.load(code_ptr + (packed & 15))).reshape(BN, 64)
                w = (w * scale[:, None]).to(dtype)
                x = tl.load(xrow + (b * 64 + kk)[None, :], mask=mask_m[:, None] & ok, other=0.0)
                acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        tile = pid_m * tl.num_programs(0) + pid_n
        finish_tile(acc, rm_safe, mask_m, rn_safe, mask_n, tile, split, M, N, out_ptr, res_ptr, t_ptr, bt_ptr,
                    slot_ptr, ws_ptr, cnt_ptr, stride_om, stride_rm, stride_ts, stride_tm, stride_bs, stride_br, R,
                    SPLITS, RP, HAS_RES, HAS_LORA, SPLIT_K)
