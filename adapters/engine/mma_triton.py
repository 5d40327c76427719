"""The Triton kernel of the many-row 4-bit product (``nf4_mma``): its own module, since Triton resolves a kernel's
helpers among its module's globals (the shared epilogue and split-K finish come from ``triton_ops``).

Imports without Triton (every module must import on a CPU-only machine); ``nf4_mma.matmul`` launches it.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
    from persona_router.adapters.engine.triton_ops import finish_tile
except ImportError:  # nf4_mma checks require_triton() before any launch
    triton = None


if triton is not None:

    @triton.jit
    def _half(bits, F16: tl.constexpr):
        """A 16-bit value in the low half of ``bits`` (int32) as float32."""
        if F16:
            return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return (bits << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _elements(words, code_ptr, tab, ASM: tl.constexpr, F16: tl.constexpr):
        """The eight codes of each word as float32 values of the 16-bit table, in element order (bitsandbytes'
        nibble order: element ``2b`` in byte ``b``'s high nibble). ``ASM``: ``nf4_dot_asm.unpack_ptx`` (register
        permutes, no memory access); empty: table loads (what Triton's interpreter runs in the CPU tests)."""
        if ASM != "":
            p0, p1, p2, p3 = tl.inline_asm_elementwise(
                ASM, "=r,=r,=r,=r,r,r,r,r,r", [words, tab[0], tab[1], tab[2], tab[3]],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
            return (_half(p0, F16), _half(p0 >> 16, F16), _half(p1, F16), _half(p1 >> 16, F16),
                    _half(p2, F16), _half(p2 >> 16, F16), _half(p3, F16), _half(p3 >> 16, F16))
        dt = tl.float16 if F16 else tl.bfloat16
        e0 = tl.load(code_ptr + ((words >> 4) & 15)).to(dt).to(tl.float32)
        e1 = tl.load(code_ptr + (words & 15)).to(dt).to(tl.float32)
        e2 = tl.load(code_ptr + ((words >> 12) & 15)).to(dt).to(tl.float32)
        e3 = tl.load(code_ptr + ((words >> 8) & 15)).to(dt).to(tl.float32)
        e4 = tl.load(code_ptr + ((words >> 20) & 15)).to(dt).to(tl.float32)
        e5 = tl.load(code_ptr + ((words >> 16) & 15)).to(dt).to(tl.float32)
        e6 = tl.load(code_ptr + ((words >> 28) & 15)).to(dt).to(tl.float32)
        e7 = tl.load(code_ptr + ((words >> 24) & 15)).to(dt).to(tl.float32)
        return e0, e1, e2, e3, e4, e5, e6, e7

    @triton.jit
    def _slice_dot(acc, xrow, kw, e: tl.constexpr, value, scale, mask_m, ASM: tl.constexpr):
        """``acc += x[:, 8 kw + e] @ (value * scale)``: one element position of every word as one K slice (the sum
        over K does not care in which order its slices come), so the decoded values need no re-ordering."""
        x = tl.load(xrow + (kw * 8 + e)[None, :], mask=mask_m[:, None], other=0.0)
        w = (value * scale).to(xrow.dtype.element_ty)
        if ASM == "":  # Triton 3.6's interpreter multiplies 16-bit dot operands as raw bits: same values in float32
            return tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(x, w, acc)

    @triton.jit
    def weight_tile(words, scale, code_ptr, tab, ASM: tl.constexpr, F16: tl.constexpr):
        """Words ``[BKW, BN]`` (and their block scales, same shape) as the weight tile ``[8 BKW, BN]`` in K order
        (row ``8 kw + e`` is element ``e`` of word ``kw``), each value scaled in float32 and rounded once to the
        activations' dtype (what ``dequantize`` does). The eight element tensors are joined along new minor axes
        and those moved next to the word axis: one tile, one tensor-core product per loop step."""
        dt = tl.float16 if F16 else tl.bfloat16
        e0, e1, e2, e3, e4, e5, e6, e7 = _elements(words, code_ptr, tab, ASM, F16)
        j01 = tl.join((e0 * scale).to(dt), (e1 * scale).to(dt))  # [BKW, BN, 2]: element 2b + a at [..., a]
        j23 = tl.join((e2 * scale).to(dt), (e3 * scale).to(dt))
        j45 = tl.join((e4 * scale).to(dt), (e5 * scale).to(dt))
        j67 = tl.join((e6 * scale).to(dt), (e7 * scale).to(dt))
        full = tl.join(tl.join(j01, j23), tl.join(j45, j67))  # [BKW, BN, a, b, c]: element 4c + 2b + a
        return tl.reshape(tl.permute(full, (0, 4, 3, 2, 1)), (words.shape[0] * 8, words.shape[1]))

    @triton.jit
    def _mma_step(acc, start, w_ptr, s_ptr, code_ptr, tab, xrow, rk, rn, rn_safe, mask_m, N, BKW: tl.constexpr,
                  EVEN_N: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr, SLICES: tl.constexpr):
        """One loop step of ``nf4_mma_kmajor``: words ``start .. start + BKW`` of the program's rows, decoded and
        multiplied into ``acc``."""
        kw = start + tl.arange(0, BKW)
        if EVEN_N:
            words = tl.load(w_ptr + kw[:, None] * N + rn[None, :])
            scale = tl.load(s_ptr + (kw // 8)[:, None] * N + rn[None, :])
        else:
            words = tl.load(w_ptr + kw[:, None] * N + rn_safe[None, :])
            scale = tl.load(s_ptr + (kw // 8)[:, None] * N + rn_safe[None, :])
        if SLICES:
            e0, e1, e2, e3, e4, e5, e6, e7 = _elements(words, code_ptr, tab, ASM, F16)
            acc = _slice_dot(acc, xrow, kw, 0, e0, scale, mask_m, ASM)
            acc = _slice_dot(acc, xrow, kw, 1, e1, scale, mask_m, ASM)
            acc = _slice_dot(acc, xrow, kw, 2, e2, scale, mask_m, ASM)
            acc = _slice_dot(acc, xrow, kw, 3, e3, scale, mask_m, ASM)
            acc = _slice_dot(acc, xrow, kw, 4, e4, scale, mask_m, ASM)
            acc = _slice_dot(acc, xrow, kw, 5, e5, scale, mask_m, ASM)
            acc = _slice_dot(acc, xrow, kw, 6, e6, scale, mask_m, ASM)
            acc = _slice_dot(acc, xrow, kw, 7, e7, scale, mask_m, ASM)
            return acc
        w = weight_tile(words, scale, code_ptr, tab, ASM, F16)
        x = tl.load(xrow + (start * 8 + rk)[None, :], mask=mask_m[:, None], other=0.0)
        if ASM == "":  # Triton 3.6's interpreter multiplies 16-bit dot operands as raw bits: fp32 instead
            return tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(x, w, acc)

    @triton.jit
    def nf4_mma_kmajor(x_ptr, w_ptr, s_ptr, code_ptr, tab_ptr, out_ptr, res_ptr, t_ptr, bt_ptr, slot_ptr, ws_ptr,
                       cnt_ptr, M, N, K: tl.constexpr, stride_xm, stride_om, stride_rm, stride_ts, stride_tm,
                       stride_bs, stride_br, R: tl.constexpr, SPLITS: tl.constexpr, RP: tl.constexpr,
                       HAS_RES: tl.constexpr, HAS_LORA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BKW: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr, F16: tl.constexpr,
                       ASM: tl.constexpr, SLICES: tl.constexpr = False, PIPE: tl.constexpr = 1):
        """Many rows: ``out = [res +] x W^T [+ LoRA]`` from the K-major layout (``nf4_gemv.KMajor``: codes as int32
        words ``[K // 8, N]``, one float32 scale per 64-element block ``[K // 64, N]``). Each loop step loads
        ``BKW`` words of ``BN`` weight rows (whole 128-byte lines: the rows run along the fast axis), decodes
        them in registers into one ``[8 BKW, BN]`` tile (``weight_tile``) and multiplies it by the rows' activations on
        the tensor cores; with ``SLICES``, eight ``[BM, BKW] x [BKW, BN]`` products instead, one per element
        position of the words, against strided activation columns (no tile re-ordering: faster for few rows).
        ``PIPE > 1``: the compiler's software pipeliner keeps that many steps' word and scale loads in flight (the
        kernel's ``num_stages`` pipelines only loads that feed a ``dot`` directly)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        split = tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BKW * 8)
        mask_m = rm < M
        mask_n = rn < N
        rm_safe = tl.where(mask_m, rm, 0)
        rn_safe = tl.where(mask_n, rn, 0)
        PER_SPLIT: tl.constexpr = K // 8 // SPLIT_K
        base = split * PER_SPLIT
        tab = (tl.load(tab_ptr), tl.load(tab_ptr + 1), tl.load(tab_ptr + 2), tl.load(tab_ptr + 3))
        xrow = x_ptr + rm_safe[:, None] * stride_xm
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if PIPE > 1:
            for i in tl.range(0, PER_SPLIT, BKW, num_stages=PIPE):
                acc = _mma_step(acc, base + i, w_ptr, s_ptr, code_ptr, tab, xrow, rk, rn, rn_safe, mask_m, N, BKW,
                                EVEN_N, F16, ASM, SLICES)
        else:
            for i in range(0, PER_SPLIT, BKW):
                acc = _mma_step(acc, base + i, w_ptr, s_ptr, code_ptr, tab, xrow, rk, rn, rn_safe, mask_m, N, BKW,
                                EVEN_N, F16, ASM, SLICES)
        tile = pid_m * tl.num_programs(0) + pid_n
        finish_tile(acc, rm_safe, mask_m, rn_safe, mask_n, tile, split, M, N, out_ptr, res_ptr, t_ptr, bt_ptr,
                    slot_ptr, ws_ptr, cnt_ptr, stride_om, stride_rm, stride_ts, stride_tm, stride_bs, stride_br, R,
                    SPLITS, RP, HAS_RES, HAS_LORA, SPLIT_K)

    @triton.jit
    def kmajor_dequant(w_ptr, s_ptr, code_ptr, tab_ptr, out_ptr, N, BN: tl.constexpr, BKW: tl.constexpr,
                       F16: tl.constexpr, ASM: tl.constexpr):
        """The dense transposed weight ``[K, N]`` (row ``k`` holds element ``k`` of every output feature) from the
        K-major layout, for the wide products that run on cuBLAS."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        kw = pid_k * BKW + tl.arange(0, BKW)
        mask_n = rn < N
        rn_safe = tl.where(mask_n, rn, 0)
        tab = (tl.load(tab_ptr), tl.load(tab_ptr + 1), tl.load(tab_ptr + 2), tl.load(tab_ptr + 3))
        words = tl.load(w_ptr + kw[:, None] * N + rn_safe[None, :])
        scale = tl.load(s_ptr + (kw // 8)[:, None] * N + rn_safe[None, :])
        w = weight_tile(words, scale, code_ptr, tab, ASM, F16)
        rk = pid_k * BKW * 8 + tl.arange(0, BKW * 8)
        tl.store(out_ptr + rk[:, None] * N + rn[None, :], w, mask=mask_n[None, :])
