"""The Triton kernel of the one-row 4-bit product (``nf4_gemv``): its own module, since Triton resolves a kernel's
helpers among its module's globals (the shared epilogue and split-K finish come from ``triton_ops``).

Imports without Triton (every module must import on a CPU-only machine); ``nf4_gemv`` launches it.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
    from persona_router.adapters.engine.triton_ops import finish_row
except ImportError:  # nf4_gemv checks require_triton() before any launch
    triton = None


if triton is not None:

    @triton.jit
    def _word_dot(words, x0, x1, x2, x3, code_ptr, tab, ASM: tl.constexpr, F16: tl.constexpr):
        """Each word's eight codes (bitsandbytes' order: byte ``b`` holds elements ``2b`` in its high and ``2b + 1``
        in its low nibble) times its eight activations (pairs ``x0..x3``), summed in float32. ``ASM``: the inline
        PTX of ``nf4_dot_asm`` (register lookups, packed 16-bit products); empty: table loads and float32 products
        (the same function to rounding: what Triton's interpreter runs in the CPU tests)."""
        if ASM != "":
            return tl.inline_asm_elementwise(ASM, "=r,r,r,r,r,r,r,r,r,r",
                                             [words, x0, x1, x2, x3, tab[0], tab[1], tab[2], tab[3]],
                                             dtype=tl.float32, is_pure=True, pack=1)
        xs = (x0, x1, x2, x3)
        total = tl.zeros(words.shape, dtype=tl.float32)
        for pair in tl.static_range(4):
            for half in tl.static_range(2):
                value = tl.load(code_ptr + ((words >> (4 * (2 * pair + 1 - half))) & 15))
                bits = (xs[pair] >> (16 * half)) & 0xFFFF
                if F16:
                    x = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                else:
                    x = (bits << 16).to(tl.float32, bitcast=True)
                total += value * x
        return total

    @triton.jit
    def _step(x_ptr, w_ptr, s_ptr, rn, kw, N, EVEN_N: tl.constexpr):
        """One loop step's loads: words ``[BN, BKW]``, their scales, and the four activation pairs of each word
        (rows past N masked unless ``EVEN_N``: the last program's rows would read past the end)."""
        if EVEN_N:
            words = tl.load(w_ptr + kw[None, :] * N + rn[:, None])
            scale = tl.load(s_ptr + (kw // 8)[None, :] * N + rn[:, None])
        else:
            rows = (rn < N)[:, None]
            words = tl.load(w_ptr + kw[None, :] * N + rn[:, None], mask=rows, other=0)
            scale = tl.load(s_ptr + (kw // 8)[None, :] * N + rn[:, None], mask=rows, other=0.0)
        x0 = tl.load(x_ptr + kw * 4)[None, :]
        x1 = tl.load(x_ptr + kw * 4 + 1)[None, :]
        x2 = tl.load(x_ptr + kw * 4 + 2)[None, :]
        x3 = tl.load(x_ptr + kw * 4 + 3)[None, :]
        return words, scale, x0, x1, x2, x3

    @triton.jit
    def _step_dot(acc, x_ptr, w_ptr, s_ptr, rn, kw, N, code_ptr, tab, EVEN_N: tl.constexpr, ASM: tl.constexpr,
                  F16: tl.constexpr):
        """One loop step, loads and products: ``acc`` plus words ``kw`` of the rows times their activations."""
        words, scale, x0, x1, x2, x3 = _step(x_ptr, w_ptr, s_ptr, rn, kw, N, EVEN_N)
        return acc + _word_dot(words, x0, x1, x2, x3, code_ptr, tab, ASM, F16) * scale

    @triton.jit
    def nf4_gemv_kmajor(x_ptr, w_ptr, s_ptr, code_ptr, tab_ptr, out_ptr, res_ptr, t_ptr, bt_ptr, slot_ptr, ws_ptr,
                        cnt_ptr, N, K: tl.constexpr, stride_om, stride_rm, stride_ts, stride_tm, stride_bs, stride_br,
                        R: tl.constexpr, SPLITS: tl.constexpr, RP: tl.constexpr, HAS_RES: tl.constexpr,
                        HAS_LORA: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, SPLIT_K: tl.constexpr,
                        PREFETCH: tl.constexpr, EVEN_N: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr,
                        UNROLL: tl.constexpr = False, STAGES: tl.constexpr = 1):
        """One row: ``out = [res +] x W^T [+ LoRA]`` from the K-major layout (``nf4_gemv.KMajor``): ``w_ptr`` the
        codes as int32 words ``[K // 8, N]`` (the word of 8 elements of row ``n`` at ``[kw, n]``), ``s_ptr`` one
        float32 scale per 64-element block ``[K // 64, N]``, ``x_ptr`` the activations as int32 pairs ``[K // 2]``.

        The rows run along the fast axis of both, so the words and the scales of a program's ``BN`` rows load in
        the same layout (16-byte vectors of four rows, whole 128-byte lines across a warp) and each loaded
        activation pair serves every row a thread holds. Each program owns ``BN`` rows and one of ``SPLIT_K``
        slices of K, ``BKW`` words of K per loop step; ``PREFETCH`` issues the next step's loads before this
        step's arithmetic; ``STAGES > 1`` has the compiler's software pipeliner keep that many steps' loads in flight
        (asynchronous copies into shared memory; a plain loop's loads are pipelined only where they feed a ``dot``)."""
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        mask_n = rn < N
        WORDS: tl.constexpr = K // 8
        PER_SPLIT: tl.constexpr = WORDS // SPLIT_K
        base = split * PER_SPLIT
        acc = tl.zeros((BN, BKW), dtype=tl.float32)
        # Four table words in registers for the whole loop (``nf4_dot_asm.register_words``), loaded, not written as
        # constants: the assembler would re-make constants for every word.
        tab = (tl.load(tab_ptr), tl.load(tab_ptr + 1), tl.load(tab_ptr + 2), tl.load(tab_ptr + 3))
        if PREFETCH:
            words, scale, x0, x1, x2, x3 = _step(x_ptr, w_ptr, s_ptr, rn, base + tl.arange(0, BKW), N, EVEN_N)
            for i in range(0, PER_SPLIT, BKW):
                # The next step's loads (the first step's again after the last: in bounds, served by the cache).
                nxt = _step(x_ptr, w_ptr, s_ptr, rn, base + (i + BKW) % PER_SPLIT + tl.arange(0, BKW), N, EVEN_N)
                acc += _word_dot(words, x0, x1, x2, x3, code_ptr, tab, ASM, F16) * scale
                words, scale, x0, x1, x2, x3 = nxt
        elif STAGES > 1:
            for i in tl.range(0, PER_SPLIT, BKW, num_stages=STAGES):
                acc = _step_dot(acc, x_ptr, w_ptr, s_ptr, rn, base + i + tl.arange(0, BKW), N, code_ptr, tab, EVEN_N,
                                ASM, F16)
        elif UNROLL:  # every step's loads in one basic block: the compiler may issue them all before any arithmetic
            for i in tl.static_range(0, PER_SPLIT, BKW):
                acc = _step_dot(acc, x_ptr, w_ptr, s_ptr, rn, base + i + tl.arange(0, BKW), N, code_ptr, tab, EVEN_N,
                                ASM, F16)
        else:
            for i in range(0, PER_SPLIT, BKW):
                acc = _step_dot(acc, x_ptr, w_ptr, s_ptr, rn, base + i + tl.arange(0, BKW), N, code_ptr, tab, EVEN_N,
                                ASM, F16)
        finish_row(acc, rn, mask_n, pid_n, split, N, out_ptr, res_ptr, t_ptr, bt_ptr, slot_ptr, ws_ptr, cnt_ptr,
                   stride_om, stride_rm, stride_ts, stride_tm, stride_bs, stride_br, R, SPLITS, RP, HAS_RES, HAS_LORA,
                   SPLIT_K)
