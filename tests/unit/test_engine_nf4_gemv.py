"""The K-major one-row NF4 product (``nf4_gemv``) and its decode instructions (``nf4_dot_asm``).

The instruction list the GPU runs as inline PTX is executed in Python for every code at every position and
both 16-bit types, against a product written from the layout's definition. The kernel is compared with a
plain-PyTorch float32 reference: under Triton's interpreter on CPU where Triton is installed (the table-load
variant, the same indexing; the project's CPU environment has no Triton, so there these skip) and compiled on
CUDA (the PTX variant, ``gpu``), at odd shapes: N not a multiple of the rows per
program, K a multiple of 64 but not of 256, split K, prefetch, residual and LoRA in the epilogue.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from persona_router.adapters.engine import nf4_dot_asm

NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176727, 0.7229568362236023, 1.0)
RANDOM_TABLE = tuple(random.Random(3).uniform(-6.0, 6.0) for _ in range(16))


def _pair(gen: random.Random, dtype: str) -> int:
    return nf4_dot_asm._bits16(gen.uniform(-4, 4), dtype) | (nf4_dot_asm._bits16(gen.uniform(-4, 4), dtype) << 16)


@pytest.mark.parametrize("layout", nf4_dot_asm.LAYOUTS)
@pytest.mark.parametrize("dtype", nf4_dot_asm.DTYPES)
@pytest.mark.parametrize("code", [NF4, RANDOM_TABLE], ids=["nf4", "random-table"])
def test_every_code_at_every_position(layout: str, dtype: str, code: tuple[float, ...]) -> None:
    one = nf4_dot_asm._bits16(1.0, dtype)
    for nibble in range(8):
        for value in range(16):
            word = (value << (4 * nibble)) | (((value + 7) % 16) << (4 * ((nibble + 3) % 8)))
            for slot in range(8):  # one activation of 1.0 at a time: the product is that slot's table entry
                pairs = [0, 0, 0, 0]
                pairs[slot // 2] = one << (16 * (slot % 2))
                got = nf4_dot_asm.emulate(word, pairs, code, dtype, layout)
                assert got == nf4_dot_asm.reference(word, pairs, code, dtype, layout), (nibble, value, slot)


@pytest.mark.parametrize("layout", nf4_dot_asm.LAYOUTS)
@pytest.mark.parametrize("dtype", nf4_dot_asm.DTYPES)
def test_random_words_and_activations(layout: str, dtype: str) -> None:
    gen = random.Random(0)
    for _ in range(400):
        word, pairs = gen.getrandbits(32), [_pair(gen, dtype) for _ in range(4)]
        assert (nf4_dot_asm.emulate(word, pairs, NF4, dtype, layout)
                == nf4_dot_asm.reference(word, pairs, NF4, dtype, layout)), hex(word)


def test_bnb_layout_reads_bitsandbytes_nibble_order() -> None:
    """Element ``2b`` of a word is the high nibble of byte ``b``: a code there meets the low half of pair ``b``."""
    one = nf4_dot_asm._bits16(1.0, "bf16")
    word = 0xF << 4  # code 15 (1.0) in byte 0's high nibble = element 0; every other code is 0 (-1.0)
    assert nf4_dot_asm.emulate(word, [one, 0, 0, 0], NF4, "bf16", "bnb") == 1.0
    assert nf4_dot_asm.emulate(word, [one << 16, 0, 0, 0], NF4, "bf16", "bnb") == -1.0


def test_ptx_reads_its_operands() -> None:
    text = nf4_dot_asm.ptx(NF4, "bf16", "bnb")
    for operand in range(10):
        assert f"${operand}" in text
    assert "$10" not in text and text.count("fma.rn.bf16x2") == 4
    assert nf4_dot_asm.ptx(NF4, "f16", "bnb").count("fma.rn.f16x2") == 4


def test_register_words_are_signed_table_words() -> None:
    words = nf4_dot_asm.table_words(NF4)
    for name, value in zip(nf4_dot_asm.REGISTER_TABLES, nf4_dot_asm.register_words(NF4), strict=True):
        assert value & 0xFFFFFFFF == words[name] and -(1 << 31) <= value < 1 << 31


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="16 entries"):
        nf4_dot_asm.table_words(NF4[:8])
    with pytest.raises(ValueError, match="layout"):
        nf4_dot_asm.program("rows")
    with pytest.raises(ValueError, match="dtype"):
        nf4_dot_asm.program("bnb", "fp8")


# -- the kernel -----------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported anywhere in this process


def _kernel_ready() -> None:
    pytest.importorskip("triton")
    pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton was loaded without its interpreter and there is no GPU")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _layout(n: int, k: int, seed: int, dtype: Any = None) -> tuple[Any, Any, Any]:
    """A bitsandbytes NF4 weight (double quantisation) and its K-major copy."""
    import bitsandbytes.functional as bnbf
    from persona_router.adapters.engine import nf4_gemv

    gen = torch.Generator().manual_seed(seed)
    dense = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16).to(_device())
    packed, state = bnbf.quantize_4bit(dense, blocksize=64, compress_statistics=True, quant_type="nf4",
                                       quant_storage=torch.uint8)
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    layout = nf4_gemv.kmajor(packed, absmax, state.code, n, k, dtype or torch.bfloat16)
    assert layout is not None
    return packed, state, layout


def _rel(got: Any, want: Any) -> float:
    assert not torch.isnan(got).any()
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_kmajor_copy_dequantizes_like_bitsandbytes() -> None:
    _kernel_ready()
    import bitsandbytes.functional as bnbf
    from persona_router.adapters.engine import nf4_gemv

    packed, state, layout = _layout(96, 320, seed=1)
    want = bnbf.dequantize_4bit(packed, state).float()
    assert torch.allclose(nf4_gemv.dequantize(layout), want, rtol=2 ** -8, atol=1e-6)
    assert layout.words.shape == (320 // 8, 96) and layout.scales.shape == (320 // 64, 96)
    assert layout.nbytes == 96 * 320 // 2 + 96 * 320 // 64 * 4


def test_kmajor_refuses_what_it_cannot_read() -> None:
    _kernel_ready()
    from persona_router.adapters.engine import nf4_gemv

    packed, state, layout = _layout(32, 128, seed=2)
    assert nf4_gemv.kmajor(packed, layout.scales, state.code, 32, 96, torch.bfloat16) is None  # K % 64
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        nf4_gemv.kmajor(packed, layout.scales.t().reshape(-1), state.code, 32, 128, torch.float32)
    with pytest.raises(ValueError, match="x must be"):
        nf4_gemv.gemv(torch.zeros(2, 128, dtype=torch.bfloat16, device=_device()), layout)
    with pytest.raises(ValueError, match="does not fit"):
        nf4_gemv.gemv(torch.zeros(1, 128, dtype=torch.bfloat16, device=_device()), layout,
                      shape=nf4_gemv.Shape(bkw=16, split_k=3))


SHAPES = [(200, 320, None), (200, 320, "s1"), (130, 512, "s2"), (96, 256, "s4"), (64, 1024, "s8"),
          (130, 1024, "s16u"), (200, 512, "s2u"), (200, 1024, "p3"), (130, 512, "p4s2")]


def _shape(name: str | None) -> Any:
    from persona_router.adapters.engine.nf4_gemv import Shape

    return {None: None, "s1": Shape(bn=64, bkw=8), "s2": Shape(bn=32, bkw=16, split_k=2, prefetch=True),
            "s4": Shape(bn=128, bkw=8, split_k=4, prefetch=True), "s8": Shape(bn=64, bkw=16, split_k=8),
            "s16u": Shape(bn=32, bkw=8, split_k=16, unroll=True),
            "s2u": Shape(bn=64, bkw=16, split_k=2, maxnreg=128, unroll=True),
            "p3": Shape(bn=64, bkw=16, stages=3), "p4s2": Shape(bn=128, bkw=8, split_k=2, maxnreg=128, stages=4)}[name]


@pytest.mark.parametrize(("n", "k", "shape"), SHAPES)
def test_gemv_matches_reference(n: int, k: int, shape: str | None) -> None:
    """Alone, with the residual, and with residual and LoRA in the epilogue; twice each (split-K counters must
    be back at zero after every launch); fresh inputs each time."""
    _kernel_ready()
    from persona_router.adapters.engine import lora_kernels, nf4_gemv

    _, _, layout = _layout(n, k, seed=n + k)
    capacity, rank = 4, 5
    a = torch.randn(capacity, rank, k, device=_device()).to(torch.bfloat16) / k ** 0.5
    bt = (torch.randn(capacity, rank, n, device=_device()) * 0.05).to(torch.bfloat16)
    scaling = torch.full((capacity + 1,), 2.0, device=_device(), dtype=torch.bfloat16)
    for _ in range(2):
        x = torch.randn(1, k, device=_device()).to(torch.bfloat16)
        residual = torch.randn(1, n, device=_device()).to(torch.bfloat16)
        slots = torch.tensor([3], device=_device())
        assert _rel(nf4_gemv.gemv(x, layout, shape=_shape(shape)), nf4_gemv.reference(x, layout)) < 1e-2
        want = nf4_gemv.reference(x, layout, residual=residual)
        assert _rel(nf4_gemv.gemv(x, layout, residual=residual, shape=_shape(shape)), want) < 1e-2
        shrunk = lora_kernels.shrink(x, a, bt, slots, scaling, m=capacity)
        want = want.float() + lora_kernels.reference(x, a, bt, slots, scaling)
        assert _rel(nf4_gemv.gemv(x, layout, residual=residual, lora=shrunk, shape=_shape(shape)), want) < 1e-2


def test_gemv_takes_float16_activations() -> None:
    _kernel_ready()
    from persona_router.adapters.engine import nf4_gemv

    _, _, layout = _layout(130, 512, seed=5, dtype=torch.float16)
    x = torch.randn(1, 512, device=_device()).to(torch.float16)
    assert _rel(nf4_gemv.gemv(x, layout), nf4_gemv.reference(x, layout)) < 1e-2
    with pytest.raises(ValueError, match="laid out for float16"):
        nf4_gemv.gemv(x.to(torch.bfloat16), layout)


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k"), [(9216, 3072), (3072, 8192)])
def test_gemv_at_model_shapes_with_default_launch(n: int, k: int) -> None:
    """Phi-3-mini's qkv and down shapes with the measured default launch shapes, against bitsandbytes' GEMV."""
    _kernel_ready()
    from persona_router.adapters.engine import nf4_gemv

    packed, state, layout = _layout(n, k, seed=7)
    x = torch.randn(1, k, device=_device()).to(torch.bfloat16)
    want = nf4_gemv.reference(x, layout)
    assert _rel(nf4_gemv.gemv(x, layout), want) < 1e-2
    import bitsandbytes.functional as bnbf

    bnb = bnbf.gemv_4bit(x, packed.t(), state=state)
    assert _rel(nf4_gemv.gemv(x, layout), bnb) < 2e-2


def test_measured_shapes_are_looked_up_by_gpu_and_weight_shape(tmp_path: Any, monkeypatch: Any) -> None:
    import json

    from persona_router.adapters.engine import nf4_gemv

    table = {"GPU A": {"128x512": [32, 16, 4, 2, False, 80], "96x256": [64, 16, 4, 3, False, 80]}}
    (tmp_path / "shapes.json").write_text(json.dumps(table))
    monkeypatch.setattr(nf4_gemv, "SHAPES_FILE", tmp_path / "shapes.json")
    nf4_gemv._measured.cache_clear()
    try:
        assert nf4_gemv.measured_shape("GPU A", 128, 512) == nf4_gemv.Shape(32, 16, 4, 2, False, 80)
        assert nf4_gemv.measured_shape("GPU A", 96, 256) is None  # split 3 does not divide K's words
        assert nf4_gemv.measured_shape("GPU B", 128, 512) is None
        assert nf4_gemv.default_shape(9216, 3072).fits(9216, 3072)
        # the pipelined loop replaces the hand-made prefetch and unrolled loops: not combined with either
        assert nf4_gemv.Shape(stages=3).fits(9216, 3072)
        assert not nf4_gemv.Shape(stages=3, unroll=True).fits(9216, 3072)
        assert not nf4_gemv.Shape(stages=3, prefetch=True).fits(9216, 3072)
        assert not nf4_gemv.Shape(stages=0).fits(9216, 3072)
    finally:
        nf4_gemv._measured.cache_clear()


def test_shipped_shapes_fit_their_weights() -> None:
    import json

    from persona_router.adapters.engine import nf4_gemv

    for gpu, entries in json.loads(nf4_gemv.SHAPES_FILE.read_text()).items():
        for key, fields in entries.items():
            n, k = (int(v) for v in key.split("x"))
            assert nf4_gemv.Shape(*fields).fits(n, k), (gpu, key)
