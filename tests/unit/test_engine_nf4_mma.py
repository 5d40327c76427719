"""The many-row NF4 product (``nf4_mma``) on the K-major copy, and the lookup it shares with the GEMV.

The lookup-only program (``nf4_dot_asm.decode_program``) is executed in Python for every code at every position
and both 16-bit types against the table's rounded entries. The kernel is compared with the plain-PyTorch float32
reference: under Triton's interpreter on CPU where Triton is installed (the table-load variant; the project's
CPU environment has no Triton, so there these skip) and compiled on CUDA (the PTX variant, ``gpu``), at odd
shapes: rows and N not multiples of the tile, K a multiple of 128 but not of the whole split, split K, residual
and LoRA in the epilogue, float16.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from persona_router.adapters.engine import nf4_dot_asm

from tests.unit.test_engine_nf4_gemv import NF4, RANDOM_TABLE, _device, _kernel_ready, _layout, _rel, torch


@pytest.mark.parametrize("dtype", nf4_dot_asm.DTYPES)
@pytest.mark.parametrize("code", [NF4, RANDOM_TABLE], ids=["nf4", "random-table"])
def test_unpack_gives_every_code_at_every_position(dtype: str, code: tuple[float, ...]) -> None:
    gen = random.Random(1)
    words = [gen.getrandbits(32) for _ in range(200)] + [v * 0x11111111 for v in range(16)]
    for word in words:
        want = [nf4_dot_asm._round16(float(code[(word >> (8 * (e // 2) + 4 * (1 - e % 2))) & 15]), dtype)
                for e in range(8)]
        assert nf4_dot_asm.emulate_unpack(word, code, dtype) == want, hex(word)


def test_unpack_ptx_names_four_outputs_and_its_inputs() -> None:
    text = nf4_dot_asm.unpack_ptx(NF4, "bf16")
    for operand in ("$0", "$1", "$2", "$3", "$4", "$5", "$6", "$7", "$8"):
        assert operand in text
    assert "$9" not in text and "fma" not in text


@pytest.mark.parametrize(("m", "n", "k", "shape"), [
    (2, 200, 256, None), (5, 96, 384, "split3"), (7, 130, 384, "slices3"), (17, 130, 512, "split2"),
    (40, 64, 1024, None), (6, 130, 1024, "pipe_slices"), (40, 96, 1024, "pipe"),
    (130, 200, 256, "wide"), (140, 96, 384, None),
])
def test_mma_matches_reference(m: int, n: int, k: int, shape: str | None) -> None:
    """Alone, with the residual, and with residual and LoRA in the epilogue (on the GPU only past
    ``GATHER_ROWS`` rows); twice each (split-K counters must be back at zero after every launch)."""
    _kernel_ready()
    from persona_router.adapters.engine import lora_kernels, nf4_gemv, nf4_mma

    _, _, layout = _layout(n, k, seed=m + n + k)
    t = {None: None, "split3": nf4_mma.MmaShape(bm=16, bn=32, split_k=3),
         "slices3": nf4_mma.MmaShape(bm=16, bn=64, split_k=3, slices=True),
         "split2": nf4_mma.MmaShape(bm=16, bn=64, bkw=32, split_k=2),
         "wide": nf4_mma.MmaShape(bm=64, bn=64, split_k=1),
         "pipe_slices": nf4_mma.MmaShape(bm=16, bn=64, split_k=2, slices=True, pipe=3),
         "pipe": nf4_mma.MmaShape(bm=64, bn=32, split_k=1, pipe=4)}[shape]
    capacity, rank = 4, 5
    a = torch.randn(capacity, rank, k, device=_device()).to(torch.bfloat16) / k ** 0.5
    bt = (torch.randn(capacity, rank, n, device=_device()) * 0.05).to(torch.bfloat16)
    scaling = torch.full((capacity + 1,), 2.0, device=_device(), dtype=torch.bfloat16)
    for _ in range(2):
        x = torch.randn(m, k, device=_device()).to(torch.bfloat16)
        residual = torch.randn(m, n, device=_device()).to(torch.bfloat16)
        slots = torch.randint(0, capacity + 1, (m,), device=_device())
        assert _rel(nf4_mma.matmul(x, layout, shape=t), nf4_gemv.reference(x, layout)) < 1e-2
        want = nf4_gemv.reference(x, layout, residual=residual)
        assert _rel(nf4_mma.matmul(x, layout, residual=residual, shape=t), want) < 1e-2
        if m > lora_kernels.GATHER_ROWS and not torch.cuda.is_available():
            continue  # the wider shrink is a bf16 tensor-core product, which Triton 3.6's interpreter gets wrong
        shrunk = lora_kernels.shrink(x, a, bt, slots, scaling, m=capacity)
        want = want.float() + lora_kernels.reference(x, a, bt, slots, scaling)
        assert _rel(nf4_mma.matmul(x, layout, residual=residual, lora=shrunk, shape=t), want) < 1e-2


def test_dense_copy_for_wide_products_is_the_rounded_reference() -> None:
    """From ``DEQUANTIZE_ROWS`` rows the product runs on a dense copy decoded into the workspace's scratch: each
    value is the 16-bit table entry (what the register lookup holds) times its float32 scale, rounded once to
    bf16; the scratch is reused, not re-allocated."""
    _kernel_ready()
    import dataclasses

    from persona_router.adapters.engine import nf4_gemv, nf4_kernels, nf4_mma

    _, _, layout = _layout(200, 384, seed=9)
    out = torch.empty(384, 200, dtype=torch.bfloat16, device=_device())
    got = nf4_mma.dequantize_t(layout, out)
    table16 = dataclasses.replace(layout, code=layout.code.to(torch.bfloat16).float())
    want = nf4_gemv.dequantize(table16).t().to(torch.bfloat16).float()
    if torch.cuda.is_available():
        assert torch.equal(got.float(), want)
    else:  # Triton 3.6's interpreter rounds float32 to bf16 toward zero (the table entry, then the product)
        assert torch.allclose(got.float(), want, rtol=2 ** -6, atol=0)
    workspace = nf4_kernels.Workspace()
    x = torch.randn(nf4_mma.DEQUANTIZE_ROWS, 384, device=_device()).to(torch.bfloat16)
    nf4_mma.matmul(x, layout, workspace=workspace)
    first = workspace.scratch(x.device, 1, torch.bfloat16).data_ptr()
    assert _rel(nf4_mma.matmul(x, layout, workspace=workspace), nf4_gemv.reference(x, layout)) < 1e-2
    assert workspace.scratch(x.device, 1, torch.bfloat16).data_ptr() == first


def test_mma_takes_float16_and_refuses_what_it_cannot_run() -> None:
    _kernel_ready()
    from persona_router.adapters.engine import nf4_gemv, nf4_mma

    _, _, layout = _layout(72, 256, seed=5, dtype=torch.float16)
    x = torch.randn(3, 256, device=_device()).to(torch.float16)
    assert _rel(nf4_mma.matmul(x, layout), nf4_gemv.reference(x, layout)) < 1e-2
    assert nf4_mma.matmul(x[:0], layout).shape == (0, 72)
    with pytest.raises(ValueError, match="laid out for float16"):
        nf4_mma.matmul(x.to(torch.bfloat16), layout)
    with pytest.raises(ValueError, match="x must be"):
        nf4_mma.matmul(x[:, :128], layout)
    with pytest.raises(ValueError, match="does not fit"):
        nf4_mma.matmul(x, layout, shape=nf4_mma.MmaShape(split_k=3))
    with pytest.raises(ValueError, match="residual must be"):
        nf4_mma.matmul(x, layout, residual=torch.zeros(3, 71, dtype=torch.float16, device=_device()))
    with pytest.raises(ValueError, match="got shape"):
        nf4_mma.matmul(x, layout, residual=torch.zeros(3, 71, dtype=torch.float16, device=_device()))
    with pytest.raises(ValueError, match="does not fit"):  # tiles must be powers of two (Triton's aranges)
        nf4_mma.matmul(x, layout, shape=nf4_mma.MmaShape(bm=24))
    with pytest.raises(ValueError, match="does not fit"):
        nf4_mma.matmul(x, layout, shape=nf4_mma.MmaShape(bm=16, pipe=0))
    with pytest.raises(ValueError, match=r"out must be a contiguous \[256, 72\]"):
        nf4_mma.dequantize_t(layout, torch.empty(72, 256, dtype=torch.float16, device=_device()))
    with pytest.raises(ValueError, match="out must be"):
        nf4_mma.dequantize_t(layout, torch.empty(256, 72, dtype=torch.bfloat16, device=_device()))
    _, _, odd_k = _layout(72, 192, seed=6, dtype=torch.float16)  # K a multiple of 64 (the GEMV's) but not of 128
    with pytest.raises(ValueError, match="K a multiple of 128, got 192"):
        nf4_mma.dequantize_t(odd_k, torch.empty(192, 72, dtype=torch.float16, device=_device()))


def test_one_row_goes_to_the_gemv() -> None:
    """Without a launch shape one row takes the K-major GEMV, residual and LoRA included: the same values."""
    _kernel_ready()
    from persona_router.adapters.engine import lora_kernels, nf4_gemv, nf4_mma

    _, _, layout = _layout(96, 256, seed=8)
    a = torch.randn(2, 4, 256, device=_device()).to(torch.bfloat16) / 16
    bt = (torch.randn(2, 4, 96, device=_device()) * 0.05).to(torch.bfloat16)
    scaling = torch.full((3,), 2.0, device=_device(), dtype=torch.bfloat16)
    x = torch.randn(1, 256, device=_device()).to(torch.bfloat16)
    residual = torch.randn(1, 96, device=_device()).to(torch.bfloat16)
    shrunk = lora_kernels.shrink(x, a, bt, torch.tensor([1], device=_device()), scaling, m=2)
    assert torch.equal(nf4_mma.matmul(x, layout, residual=residual, lora=shrunk),
                       nf4_gemv.gemv(x, layout, residual=residual, lora=shrunk))


def test_default_shapes_fit_phi3_mini() -> None:
    from persona_router.adapters.engine.nf4_mma import default_shape

    for m in (2, 8, 16, 33, 64, 128, 4096):
        for n, k in ((9216, 3072), (3072, 3072), (16384, 3072), (3072, 8192)):
            shape = default_shape(m, n, k)
            assert shape.fits(n, k) and shape.slices == (m <= 16), (m, n, k)
    # at 2 rows the measured best splits: 8 for qkv, o and down, 4 for gate_up
    assert [default_shape(2, n, k).split_k for n, k in ((9216, 3072), (3072, 3072), (16384, 3072), (3072, 8192))] \
        == [8, 8, 4, 8]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 16, 64, 200])
def test_mma_at_model_shapes_with_default_launch(m: int, **_: Any) -> None:
    """Phi-3-mini's down shape with the default launch shapes, against bitsandbytes' own dequantised product."""
    _kernel_ready()
    import bitsandbytes.functional as bnbf
    from persona_router.adapters.engine import nf4_gemv, nf4_mma

    packed, state, layout = _layout(3072, 8192, seed=7)
    x = torch.randn(m, 8192, device=_device()).to(torch.bfloat16)
    assert _rel(nf4_mma.matmul(x, layout), nf4_gemv.reference(x, layout)) < 1e-2
    assert _rel(nf4_mma.matmul(x, layout), x @ bnbf.dequantize_4bit(packed, state).t()) < 2e-2
