"""The decode-attention Triton kernels (see ``attention_kernels`` for the launcher and the plain-torch reference).

Their own module, with their helpers beside them: Triton resolves a kernel's helper functions among its
module's globals. Imports without Triton; ``triton_ops.require_triton`` says what to install.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the engine's torch paths need no Triton
    triton = None


if triton is not None:

    @triton.jit
    def rotary(x_ptr, d, d_ok, cos_ptr, sin_ptr, pos, ROT: tl.constexpr, dtype: tl.constexpr):
        """Head vector at ``x_ptr`` with the rotary embedding of position ``pos`` on its first ``ROT`` dims
        (``x * cos + rotate_half(x) * sin``, Hugging Face's layout), rounded to ``dtype`` as the model stores it."""
        x = tl.load(x_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        if ROT > 0:
            half: tl.constexpr = ROT // 2
            in_rot = d < ROT
            partner = tl.where(d < half, d + half, d - half)
            other = tl.load(x_ptr + partner, mask=in_rot, other=0.0).to(tl.float32)
            c = tl.load(cos_ptr + pos * ROT + d, mask=in_rot, other=1.0).to(tl.float32)
            s = tl.load(sin_ptr + pos * ROT + d, mask=in_rot, other=0.0).to(tl.float32)
            sign = tl.where(d < half, -1.0, 1.0)
            x = tl.where(in_rot, x * c + sign * other * s, x)
        return x.to(dtype)

    @triton.jit
    def attend_block(k_cache_ptr, v_cache_ptr, cache, stride_cl, start, pos, lowest, d, d_ok, q, m_i, l_i, acc,
                     BL: tl.constexpr):
        """One online-softmax step over cache positions ``start .. start + BL - 1`` (those in ``[lowest, pos)``)."""
        ll = start + tl.arange(0, BL)
        live = (ll < pos) & (ll >= lowest)
        offs = cache + ll[:, None] * stride_cl + d[None, :]
        both = live[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + offs, mask=both, other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + offs, mask=both, other=0.0).to(tl.float32)
        scores = tl.where(live, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new)
        return m_new, l_i * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p[:, None] * v, axis=0)

    @triton.jit
    def row_head_inputs(q_ptr, k_new_ptr, v_new_ptr, pos_ptr, cos_ptr, sin_ptr, n, h, stride_qn, stride_qh,
                        stride_kn, stride_kh, stride_vn, stride_vh, stride_cb, stride_ch, scale, GROUP: tl.constexpr,
                        D: tl.constexpr, DP: tl.constexpr, ROT: tl.constexpr, dtype: tl.constexpr):
        """What a program of row ``n``, query head ``h`` starts from, in both decode kernels: the row's position,
        the head dims and their mask, the query (rotated, scaled, float32), the new key (rotated) and value in the
        cache's dtype, and the offset of the row's KV group in the cache."""
        kv = h // GROUP
        pos = tl.load(pos_ptr + n)
        d = tl.arange(0, DP)
        d_ok = d < D
        q = rotary(q_ptr + n * stride_qn + h * stride_qh, d, d_ok, cos_ptr, sin_ptr, pos, ROT,
                   dtype).to(tl.float32) * scale
        k_new = rotary(k_new_ptr + n * stride_kn + kv * stride_kh, d, d_ok, cos_ptr, sin_ptr, pos, ROT, dtype)
        v_new = tl.load(v_new_ptr + n * stride_vn + kv * stride_vh + d, mask=d_ok, other=0.0).to(dtype)
        return pos, d, d_ok, q, k_new, v_new, n * stride_cb + kv * stride_ch

    @triton.jit
    def decode_attention(q_ptr, k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, out_ptr, cos_ptr, sin_ptr,
                         stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_cb, stride_ch,
                         stride_cl, stride_on, stride_oh, scale, GROUP: tl.constexpr, D: tl.constexpr,
                         DP: tl.constexpr, BL: tl.constexpr, NBLK: tl.constexpr, WINDOW: tl.constexpr,
                         ROT: tl.constexpr, GUARD: tl.constexpr):
        """One query token of row ``n``, head ``h`` over cache positions ``0..pos`` (``pos`` is the row's own).

        With ``ROT > 0`` the query and new key arrive before the rotary embedding, which is applied here (two
        fewer kernels per layer). The new key and value (position ``pos``) come from registers and are written
        to the cache by the first query head of each KV group; blocks past ``pos`` are skipped, so a row reads
        only its live length. Online softmax in float32.
        """
        n = tl.program_id(0)
        h = tl.program_id(1)
        pos, d, d_ok, q, k_new, v_new, cache = row_head_inputs(
            q_ptr, k_new_ptr, v_new_ptr, pos_ptr, cos_ptr, sin_ptr, n, h, stride_qn, stride_qh, stride_kn, stride_kh,
            stride_vn, stride_vh, stride_cb, stride_ch, scale, GROUP, D, DP, ROT, k_cache_ptr.dtype.element_ty)
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
            if GUARD:  # skip blocks past the row's position (no load instructions for them at all)
                if (start < pos) & (start + BL > lowest):
                    m_i, l_i, acc = attend_block(k_cache_ptr, v_cache_ptr, cache, stride_cl, start, pos, lowest, d,
                                                 d_ok, q, m_i, l_i, acc, BL)
            else:  # every block with masked loads: no branch, so the loads of all blocks can be issued early
                m_i, l_i, acc = attend_block(k_cache_ptr, v_cache_ptr, cache, stride_cl, start, pos, lowest, d,
                                             d_ok, q, m_i, l_i, acc, BL)
        # acc started as v_new with weight exp(s_new - m) where m began at s_new: consistent with l_i.
        tl.store(out_ptr + n * stride_on + h * stride_oh + d, (acc / l_i).to(out_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def decode_attention_split(q_ptr, k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, out_ptr, cos_ptr,
                               sin_ptr, ws_ptr, cnt_ptr, rows, stride_qn, stride_qh, stride_kn, stride_kh, stride_vn,
                               stride_vh, stride_cb, stride_ch, stride_cl, stride_on, stride_oh, scale,
                               HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                               BL: tl.constexpr, NSPLIT: tl.constexpr, NSP: tl.constexpr, WINDOW: tl.constexpr,
                               ROT: tl.constexpr):
        """``decode_attention`` with the cache positions split over programs (flash-decoding): program
        ``(n, h, s)`` attends the ``BL`` positions of block ``s`` (split 0 also the new position, from registers,
        and writes the new key and value to the cache), stores its partial softmax state (running max, sum,
        weighted values) in ``ws_ptr``; the last program of ``(n, h)`` to arrive (counted atomically in
        ``cnt_ptr``) merges the ``NSPLIT`` states in a fixed order and writes the output. One launch; each
        program's latency is one block's, so a few rows still fill the GPU."""
        n = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        pos, d, d_ok, q, k_new, v_new, cache = row_head_inputs(
            q_ptr, k_new_ptr, v_new_ptr, pos_ptr, cos_ptr, sin_ptr, n, h, stride_qn, stride_qh, stride_kn, stride_kh,
            stride_vn, stride_vh, stride_cb, stride_ch, scale, GROUP, D, DP, ROT, k_cache_ptr.dtype.element_ty)
        first = s == 0
        if first & (h % GROUP == 0):  # no other program reads position pos: it comes from registers
            tl.store(k_cache_ptr + cache + pos * stride_cl + d, k_new, mask=d_ok)
            tl.store(v_cache_ptr + cache + pos * stride_cl + d, v_new, mask=d_ok)
        # Split 0 starts from the current position (always visible); the others from an empty state whose
        # finite "max" keeps exp() of the differences free of inf - inf.
        m_i = tl.where(first, tl.sum(q * k_new.to(tl.float32), axis=0), -1.0e30)
        l_i = tl.where(first, 1.0, 0.0)
        acc = tl.where(first, v_new.to(tl.float32), 0.0)
        lowest = pos - WINDOW + 1 if WINDOW > 0 else pos * 0
        start = s * BL
        if (start < pos) & (start + BL > lowest):
            m_i, l_i, acc = attend_block(k_cache_ptr, v_cache_ptr, cache, stride_cl, start, pos, lowest, d, d_ok, q,
                                         m_i, l_i, acc, BL)
        state = ws_ptr + ((s * rows + n) * HEADS + h) * (DP + 2)
        tl.store(state + d, acc)
        tl.store(state + DP, m_i)
        tl.store(state + DP + 1, l_i)
        tl.debug_barrier()  # every thread's part of the state is written before the count says so
        arrived = tl.atomic_add(cnt_ptr + n * HEADS + h, 1, sem="acq_rel", scope="gpu")
        if arrived == NSPLIT - 1:
            splits = tl.arange(0, NSP)
            ok = splits < NSPLIT
            states = ws_ptr + ((splits * rows + n) * HEADS + h) * (DP + 2)
            ms = tl.load(states + DP, mask=ok, other=-1.0e30, cache_modifier=".cg")
            ls = tl.load(states + DP + 1, mask=ok, other=0.0, cache_modifier=".cg")
            weights = tl.where(ok, tl.exp(ms - tl.max(ms, axis=0)), 0.0)
            accs = tl.load(states[:, None] + d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
            total = tl.sum(accs * weights[:, None], axis=0) / tl.sum(ls * weights, axis=0)
            tl.store(out_ptr + n * stride_on + h * stride_oh + d, total.to(out_ptr.dtype.element_ty), mask=d_ok)
            tl.atomic_xchg(cnt_ptr + n * HEADS + h, 0, sem="relaxed", scope="gpu")
