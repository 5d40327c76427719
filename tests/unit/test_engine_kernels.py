"""The engine's Triton kernels against plain PyTorch references (fused NF4 product, BGMV LoRA).

Without a GPU they run under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton loads) in
float32; the ``gpu``-marked cases run compiled on CUDA in bfloat16. Shapes are deliberately odd: rows not a
multiple of any tile, output widths not a multiple of the column block, K a multiple of 64 but not of 256,
ranks that are not powers of two, and rows without an adapter (slot 0) mixed with rows that have one.
Tolerances: float32 (interpreter) 1e-4 relative, only summation order differs; bfloat16 (GPU) 1e-2
relative, bf16 operands with float32 accumulation.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported anywhere in this process
pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")

from persona_router.adapters.engine import lora_kernels, nf4_kernels  # noqa: E402

from tests.support.nf4 import FakeLinear4bit  # noqa: E402
from tests.unit.test_engine_equivalence import (  # noqa: E402
    ADAPTER_SPECS,
    collect,
    engine_adapters,
    generated,
    make_engine,
    peft_reference,
    prompts,
    request,
)

__all__ = ["engine_adapters", "peft_reference"]  # fixtures


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype() -> Any:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


TOL = 1e-2 if torch.cuda.is_available() else 1e-4


def _quantized(n: int, k: int, *, double: bool = True, seed: int = 0) -> FakeLinear4bit:
    import bitsandbytes.functional as bnbf

    gen = torch.Generator().manual_seed(seed)
    dense = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16).to(_device())
    packed, state = bnbf.quantize_4bit(dense, blocksize=64, compress_statistics=double, quant_type="nf4",
                                       quant_storage=torch.uint8)
    return FakeLinear4bit(packed, state)


def _rel(got: Any, want: Any) -> float:
    assert not torch.isnan(got).any()
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("double", [True, False])
def test_dequantize_matches_bitsandbytes(double: bool) -> None:
    import bitsandbytes.functional as bnbf

    module = _quantized(96, 192, double=double)
    weight = nf4_kernels.nf4_weight([module])
    assert weight is not None
    want = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
    assert torch.equal(nf4_kernels.dequantize(weight, want.dtype), want)


def test_unsupported_layouts_are_refused() -> None:
    import bitsandbytes.functional as bnbf

    dense = torch.randn(32, 96, dtype=torch.bfloat16, device=_device())  # K not a multiple of 64
    packed, state = bnbf.quantize_4bit(dense, blocksize=32, quant_type="nf4")
    assert nf4_kernels.nf4_weight([FakeLinear4bit(packed, state)]) is None


TILES = [
    nf4_kernels.Tiles("gemv", 1, 8, 8, 4),  # several K steps per program
    nf4_kernels.Tiles("gemv", 1, 16, 16, 4, split_k=3),  # split K, the slices uneven and some steps masked
    nf4_kernels.Tiles("gemv", 1, 8, 8, 4, split_k=2, xvec=True),  # activations split in registers
    nf4_kernels.Tiles("dot", 16, 32, 2, 4, 2),
    nf4_kernels.Tiles("dot", 16, 32, 1, 4, 2, split_k=2),
    nf4_kernels.Tiles("dot", 64, 64, 2, 4, 2),
    nf4_kernels.Tiles("dot", 32, 64, 1, 4, 2, split_k=3),
]


@pytest.mark.parametrize(("m", "n", "k"), [(1, 48, 192), (1, 130, 512), (3, 80, 256), (17, 130, 512), (70, 96, 320)])
def test_nf4_matmul_matches_reference(m: int, n: int, k: int) -> None:
    """The default launch shape for each row count, plus every explicit shape that takes ``m`` rows."""
    weight = nf4_kernels.nf4_weight([_quantized(n, k, seed=m)])
    assert weight is not None
    x = torch.randn(m, k, device=_device()).to(_dtype())
    residual = torch.randn(m, n, device=_device()).to(_dtype())
    want_res = nf4_kernels.reference_matmul(x, weight, residual=residual)
    want = nf4_kernels.reference_matmul(x, weight)
    shapes = [None, *(t for t in TILES if (t.kind == "gemv") == (m == 1))]
    for tiles in shapes:
        for _ in range(2):  # twice: split-K counters must be back at zero after a launch
            assert _rel(nf4_kernels.nf4_matmul(x, weight, residual=residual, tiles=tiles), want_res) < TOL, tiles
        assert _rel(nf4_kernels.nf4_matmul(x, weight, tiles=tiles), want) < TOL, tiles


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k"), [(48, 192), (130, 512)])
def test_bitsandbytes_gemv_view_matches_reference(n: int, k: int) -> None:
    """``Gemv4bit`` (bitsandbytes' one-row CUDA kernel, absmax decoded once) computes the dequantised product."""
    from persona_router.adapters.engine.weights import Gemv4bit

    module = _quantized(n, k, seed=n)
    weight = nf4_kernels.nf4_weight([module])
    assert weight is not None
    x = torch.randn(1, k, device=_device()).to(_dtype())
    assert _rel(Gemv4bit.of(module)(x), nf4_kernels.reference_matmul(x, weight)) < TOL


@pytest.mark.gpu  # inline PTX: Triton's interpreter does not run it (tests/unit/test_engine_nf4_lut.py checks the
# same instruction list in Python)
@pytest.mark.parametrize(("n", "k", "split"), [(48, 192, 1), (130, 512, 1), (130, 512, 2), (3072, 3072, 2),
                                               (200, 8192, 4)])
def test_register_lookup_gemv_matches_reference(n: int, k: int, split: int) -> None:
    """The one-row NF4 product with the code table in registers (decoded absmax), alone and with residual and
    LoRA in its epilogue, split-K twice in a row; and ``Gemv4bit``'s view of a module for it."""
    from persona_router.adapters.engine.nf4_lut import ptx
    from persona_router.adapters.engine.weights import Gemv4bit

    module = _quantized(n, k, seed=n + split)
    weight = nf4_kernels.nf4_weight([module])
    assert weight is not None
    view = nf4_kernels.decoded(weight)
    asm = ptx(view.code.tolist())
    default = nf4_kernels.lut_tiles(n, k)
    assert default is not None
    tiles = nf4_kernels.Tiles("gemv", 1, default.bn, default.inner // split, default.warps, 1, split, xvec=True)
    x = torch.randn(1, k, device=_device()).to(_dtype())
    residual = torch.randn(1, n, device=_device()).to(_dtype())
    a, bt, scaling = _bank(3, 16, k, n)
    slots = torch.tensor([2], device=_device())
    lora = lora_kernels.reference(x, a, bt, slots, scaling)
    want = nf4_kernels.reference_matmul(x, weight)
    want_full = nf4_kernels.reference_matmul(x, weight, residual=residual, lora=lora)
    for _ in range(2):  # split-K counters back at zero after each launch
        assert _rel(nf4_kernels.nf4_matmul(x, view, tiles=tiles, lut=asm), want) < TOL
        got = nf4_kernels.nf4_matmul(x, view, residual=residual, tiles=tiles, lut=asm,
                                     lora=lora_kernels.shrink(x, a, bt, slots, scaling))
        assert _rel(got, want_full) < TOL
    gemv = Gemv4bit.of(module, kernel="triton")
    assert gemv.lut is not None
    assert _rel(nf4_kernels.nf4_matmul(x, gemv.lut[0], lut=gemv.lut[1]), want) < TOL


def test_register_lookup_refuses_ragged_steps() -> None:
    weight = nf4_kernels.nf4_weight([_quantized(16, 192)])
    assert weight is not None
    ragged = nf4_kernels.Tiles("gemv", 1, 8, 16, 4, 1, 1, xvec=True)  # 24 words: not whole steps of 16
    with pytest.raises(ValueError, match="register-lookup"):
        nf4_kernels.nf4_matmul(torch.randn(1, 192, device=_device()).to(_dtype()), weight, tiles=ragged, lut="x")


def test_expand_adds_the_residual() -> None:
    k, n, capacity, rank = 128, 80, 2, 8
    a, bt, scaling = _bank(capacity, rank, k, n)
    slots = torch.tensor([1, 0, 2], device=_device())
    x = torch.randn(3, k, device=_device()).to(_dtype())
    base, residual = (torch.randn(3, n, device=_device()).to(_dtype()) for _ in range(2))
    want = base.float() + residual.float() + lora_kernels.reference(x, a, bt, slots, scaling)
    got = lora_kernels.expand_(base.clone(), lora_kernels.shrink(x, a, bt, slots, scaling), residual)
    assert _rel(got, want) < TOL


def test_gemv_refuses_several_rows() -> None:
    weight = nf4_kernels.nf4_weight([_quantized(16, 64)])
    assert weight is not None
    with pytest.raises(ValueError, match="one row"):
        nf4_kernels.nf4_matmul(torch.randn(2, 64, device=_device()).to(_dtype()), weight, tiles=TILES[0])


def test_fused_parts_equal_separate_parts() -> None:
    """Llama's q/k/v stacked along N give the same product as each part on its own."""
    parts = [_quantized(64, 256, seed=s) for s in range(3)]  # 64*256/64 = 256 scales: whole second-level blocks
    fused = nf4_kernels.nf4_weight(parts)
    assert fused is not None and fused.n == 192
    x = torch.randn(5, 256, device=_device()).to(_dtype())
    want = torch.cat([nf4_kernels.reference_matmul(x, nf4_kernels.nf4_weight([p])) for p in parts], dim=1)
    assert _rel(nf4_kernels.nf4_matmul(x, fused), want) < TOL


def _bank(capacity: int, rank: int, k: int, n: int) -> tuple[Any, Any, Any]:
    gen = torch.Generator().manual_seed(rank)
    a = (torch.randn(capacity, rank, k, generator=gen) / k ** 0.5).to(_device()).to(_dtype())
    bt = (torch.randn(capacity, rank, n, generator=gen) * 0.1).to(_device()).to(_dtype())
    scaling = torch.cat([torch.zeros(1), torch.rand(capacity, generator=gen) + 0.5]).to(_device()).to(_dtype())
    return a, bt, scaling


@pytest.mark.parametrize(("m", "rank"), [(1, 16), (3, 5), (20, 48), (70, 16)])
def test_lora_shrink_expand_match_reference(m: int, rank: int) -> None:
    k, n, capacity = 320, 96, 4
    a, bt, scaling = _bank(capacity, rank, k, n)
    slots = torch.tensor([(i * 3) % (capacity + 1) for i in range(m)], device=_device())  # includes slot 0
    x = torch.randn(m, k, device=_device()).to(_dtype())
    base = torch.randn(m, n, device=_device()).to(_dtype())
    want = base.float() + lora_kernels.reference(x, a, bt, slots, scaling)
    shrunk = lora_kernels.shrink(x, a, bt, slots, scaling)
    got = lora_kernels.expand_(base.clone(), shrunk)
    assert _rel(got, want) < TOL
    no_adapter = slots == 0
    if no_adapter.any():  # rows without an adapter are left exactly as they were
        assert torch.equal(got[no_adapter], base[no_adapter])


@pytest.mark.parametrize("block_n", [16, 64, 256])
def test_few_row_expand_column_blocks(block_n: int) -> None:
    """The few-row expand (one program per row and column block) for column blocks narrower and wider than
    the output, with a residual, 11 splits of K (not a power of two) and a row without an adapter."""
    k, n, capacity, rank = 700, 100, 3, 12
    a, bt, scaling = _bank(capacity, rank, k, n)
    slots = torch.tensor([2, 0, 3, 1], device=_device())
    x = torch.randn(4, k, device=_device()).to(_dtype())
    base, residual = (torch.randn(4, n, device=_device()).to(_dtype()) for _ in range(2))
    shrunk = lora_kernels.shrink(x, a, bt, slots, scaling)
    assert shrunk.splits == 11  # chunks of 64 columns
    want = base.float() + residual.float() + lora_kernels.reference(x, a, bt, slots, scaling)
    got = lora_kernels.expand_(base.clone(), shrunk, residual, block_n=block_n)
    assert _rel(got, want) < TOL
    assert torch.equal(got[1], (base[1].float() + residual[1].float()).to(base.dtype))


@pytest.mark.parametrize(("m", "kind", "slots_present"), [(1, "norm", 3), (5, "silu_mul", 3), (20, "norm", 2),
                                                          (20, "silu_mul", 3), (70, None, 3)])
def test_lora_shrink_prologue(m: int, kind: str | None, slots_present: int) -> None:
    """The shrink computes RMSNorm or the gated activation of its input on the way (and returns it for the base
    product), for the per-row gather (few rows) and the tensor-core form (many rows, only ``slots_present``
    slots in the batch)."""
    from persona_router.adapters.engine.kernels import gated, rms_norm

    k, n, capacity, rank = 320, 96, 4, 16
    a, bt, scaling = _bank(capacity, rank, k, n)
    slots = torch.tensor([(i * 3) % (slots_present + 1) for i in range(m)], device=_device())
    gen = torch.Generator().manual_seed(m)
    weight = (torch.rand(k, generator=gen) + 0.5).to(_device()).to(_dtype())
    x = torch.randn(m, 2 * k if kind == "silu_mul" else k, generator=gen).to(_device()).to(_dtype())
    prologue = lora_kernels.Prologue(kind, weight if kind == "norm" else None, 1e-5) if kind else None
    want_h = {"norm": lambda: rms_norm(x, weight, 1e-5), "silu_mul": lambda: gated(torch.nn.functional.silu)(x),
              None: lambda: x}[kind]()
    shrunk = lora_kernels.shrink(x, a, bt, slots, scaling, m=slots_present, prologue=prologue)
    assert _rel(shrunk.h, want_h) < TOL
    base = torch.randn(m, n, device=_device()).to(_dtype())
    want = base.float() + lora_kernels.reference(want_h, a, bt, slots, scaling)
    assert _rel(lora_kernels.expand_(base.clone(), shrunk), want) < TOL


@pytest.mark.parametrize("tiling", [(16, 16), (16, 3), (32, 8), (64, 1), (64, 8)])
@pytest.mark.parametrize("kind", ["norm", "silu_mul"])
def test_lora_shrink_tilings_agree(tiling: tuple[int, int], kind: str) -> None:
    """Every (rows per program, K chunks) of the many-row shrink gives the default tiling's result: rows that
    straddle a tile, chunks that do not divide K (the last one partly or wholly past it)."""
    k, n, capacity, rank, m = 320, 96, 4, 16, 37
    a, bt, scaling = _bank(capacity, rank, k, n)
    slots = torch.tensor([(i * 3) % (capacity + 1) for i in range(m)], device=_device())
    gen = torch.Generator().manual_seed(5)
    weight = (torch.rand(k, generator=gen) + 0.5).to(_device()).to(_dtype())
    x = torch.randn(m, 2 * k if kind == "silu_mul" else k, generator=gen).to(_device()).to(_dtype())
    prologue = lora_kernels.Prologue(kind, weight if kind == "norm" else None, 1e-5)
    want = lora_kernels.shrink(x, a, bt, slots, scaling, m=capacity, prologue=prologue)
    got = lora_kernels.shrink(x, a, bt, slots, scaling, m=capacity, prologue=prologue, tiling=tiling)
    assert got.splits == tiling[1]
    assert _rel(got.h, want.h) < TOL  # the norm's sum of squares may run in other steps
    base = torch.randn(m, n, generator=gen).to(_device()).to(_dtype())
    assert _rel(lora_kernels.expand_(base.clone(), got), lora_kernels.expand_(base.clone(), want).float()) < TOL


@pytest.mark.parametrize(("m", "capacity", "rank", "residual"), [(9, 4, 16, True), (37, 4, 16, False),
                                                               (70, 6, 12, True), (20, 9, 16, False)])
def test_lora_dense_expand_matches_reference(m: int, capacity: int, rank: int, residual: bool) -> None:
    """The many-row expand (each row's sums in its own slot's columns, one product with the stacked ``Bt``,
    residual included) against the float32 reference, for row counts off the tile size, a rank that is not a power
    of two and more slots than one 64-column step holds (9 x 16 = 144); rows of slot 0 get exactly their base (plus
    residual)."""
    k, n = 256, 200
    a, bt, scaling = _bank(capacity, rank, k, n)
    slots = torch.tensor([(i * 5) % (capacity + 1) for i in range(m)], device=_device())
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(_device()).to(_dtype())
    base = torch.randn(m, n, generator=gen).to(_device()).to(_dtype())
    res = torch.randn(m, n, generator=gen).to(_device()).to(_dtype()) if residual else None
    shrunk = lora_kernels.shrink(x, a, bt, slots, scaling)
    got = lora_kernels.expand_(base.clone(), shrunk, res)
    plain = base.float() + (res.float() if res is not None else 0.0)
    assert _rel(got, plain + lora_kernels.reference(x, a, bt, slots, scaling)) < TOL
    idle = slots == 0
    assert torch.equal(got[idle], plain[idle].to(base.dtype))


def test_lora_shrink_rejects_bad_tiling() -> None:
    a, bt, scaling = _bank(2, 16, 64, 32)
    x = torch.randn(12, 64, device=_device()).to(_dtype())
    slots = torch.ones(12, dtype=torch.int64, device=_device())
    with pytest.raises(ValueError, match="tiling"):
        lora_kernels.shrink(x, a, bt, slots, scaling, tiling=(8, 4))


@pytest.mark.parametrize(("m", "split"), [(1, 1), (1, 2), (6, 1), (6, 2), (33, 1)])
def test_nf4_matmul_with_lora_and_residual(m: int, split: int) -> None:
    k, n, capacity, rank = 256, 80, 3, 16
    weight = nf4_kernels.nf4_weight([_quantized(n, k, seed=7)])
    assert weight is not None
    a, bt, scaling = _bank(capacity, rank, k, n)
    slots = torch.tensor([(i + 1) % (capacity + 1) for i in range(m)], device=_device())  # slot 0 from m = 4
    x = torch.randn(m, k, device=_device()).to(_dtype())
    residual = torch.randn(m, n, device=_device()).to(_dtype())
    lora = lora_kernels.reference(x, a, bt, slots, scaling)
    want = nf4_kernels.reference_matmul(x, weight, residual=residual, lora=lora)
    tiles = nf4_kernels.default_tiles(m, n, k)
    tiles = nf4_kernels.Tiles(tiles.kind, tiles.bm, tiles.bn, tiles.inner, tiles.warps, tiles.stages, split)
    got = nf4_kernels.nf4_matmul(x, weight, residual=residual, tiles=tiles,
                                 lora=lora_kernels.shrink(x, a, bt, slots, scaling))
    assert _rel(got, want) < TOL


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "window", "rot", "launch"),
                         [(4, 4, 96, None, 96, None), (6, 2, 40, None, 0, None), (4, 2, 32, 5, 16, None),
                          (4, 4, 96, None, 96, (32, 2, False)), (4, 2, 32, 5, 16, (16, 1, False)),
                          (6, 2, 40, None, 0, (32, 4, True)), (4, 4, 96, None, 96, (64, 4, True, False)),
                          (4, 2, 32, 5, 16, (16, 1, True, True)), (6, 2, 40, None, 0, (64, 2, True, True)),
                          (4, 4, 96, None, 96, (32, 1, True, True))])
def test_decode_attention_matches_reference(heads: int, kv_heads: int, dim: int, window: int | None,
                                            rot: int, launch: tuple[Any, ...] | None) -> None:
    """Live-length decode attention; ``rot > 0``: the kernel also applies the rotary embedding (full or partial)
    to the query and the new key, which the reference does with the engine's eager ``rotate``. ``launch``:
    other block sizes, the branch-free form (every block loaded under masks, junk past the row unread) and the
    split form (one program per block, merged by the last; the default for these four rows). Each launch runs
    twice: the split form's arrival counters must be back at zero."""
    from persona_router.adapters.engine import attention_kernels

    rows, cache_len, n = 5, 160, 4
    gen = torch.Generator().manual_seed(heads * dim)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen).to(_device()).to(_dtype())

    k_cache, v_cache = rand(rows, kv_heads, cache_len, dim), rand(rows, kv_heads, cache_len, dim)
    # Non-finite junk past every row's position: the kernel must never read it.
    k_cache[:, :, 150:] = float("nan")
    positions = torch.tensor([0, 63, 64, 149], device=_device())
    qkv = rand(n, (heads + 2 * kv_heads) * dim)  # strided views into one buffer, as in the forward pass
    q = qkv[:, :heads * dim].view(n, heads, dim)
    k_new = qkv[:, heads * dim:(heads + kv_heads) * dim].view(n, kv_heads, dim)
    v_new = qkv[:, (heads + kv_heads) * dim:].view(n, kv_heads, dim)
    angles = torch.arange(cache_len, dtype=torch.float32)[:, None] * torch.rand(1, rot // 2, generator=gen)
    rotary = tuple(f(torch.cat([angles, angles], dim=1)).to(_device()).to(_dtype()) for f in (torch.cos, torch.sin))
    tables = rotary if rot else None
    want, k_want, v_want = attention_kernels.reference(q, k_new, v_new, k_cache, v_cache, positions, window,
                                                       rotary=tables)
    before = k_cache.clone()
    shape = attention_kernels.Launch(*launch) if launch else None
    got = attention_kernels.decode_attention(q, k_new, v_new, k_cache, v_cache, positions, kv_len=160, window=window,
                                             rotary=tables, launch=shape)
    assert _rel(got, want) < TOL
    again = attention_kernels.decode_attention(q, k_new, v_new, k_cache, v_cache, positions, kv_len=160,
                                               window=window, rotary=tables, launch=shape)
    assert torch.equal(again, got)
    written = torch.arange(n, device=_device()), slice(None), positions  # the new keys and values
    assert _rel(k_cache[written], k_want[written]) < TOL
    assert torch.equal(v_cache[written], v_want[written])
    k_cache[written] = before[written]
    assert torch.equal(k_cache.nan_to_num(), before.nan_to_num())  # nothing else written


@pytest.mark.parametrize(("m", "rank", "splits", "slots"), [(20, 16, 3, 4), (70, 5, 1, 2)])
def test_many_row_expand_adds_each_rows_own_adapter(m: int, rank: int, splits: int, slots: int) -> None:
    """Past ``GATHER_ROWS`` rows the expand lays each row's summed partials into its own slot's columns and
    runs one product with the stacked ``Bt``: against a plain-torch per-row product, with and without the
    residual; rows of slot 0 get the base alone, and a NaN in a slot no row of the step holds reaches no row."""
    from persona_router.adapters.engine import lora_kernels

    n, capacity = 96, 4
    gen = torch.Generator().manual_seed(m)
    bt = (torch.randn(capacity, rank, n, generator=gen) * 0.1).to(_device()).to(_dtype())
    bt[slots:] = float("nan")  # beyond the step's slot bucket: never multiplied
    slot_ids = torch.tensor([i % (slots + 1) for i in range(m)], device=_device())
    rank_pow2 = 1 << (rank - 1).bit_length()
    t = torch.randn(splits, m, rank_pow2, generator=gen).to(_device())
    shrunk = lora_kernels.LoraShrunk(t=t, bt=bt, slot_ids=slot_ids, rank=rank, rank_pow2=rank_pow2, splits=splits,
                                     slots=slots)
    sums = t[:, :, :rank].sum(0)
    index = (slot_ids - 1).clamp(min=0)
    lora = torch.einsum("mr,mrn->mn", sums, bt[index].float()) * (slot_ids > 0).unsqueeze(-1)
    base = torch.randn(m, n, generator=gen).to(_device()).to(_dtype())
    residual = torch.randn(m, n, generator=gen).to(_device()).to(_dtype())
    got = lora_kernels.expand_(base.clone(), shrunk)
    assert _rel(got, base.float() + lora) < TOL
    got = lora_kernels.expand_(base.clone(), shrunk, residual)
    assert _rel(got, base.float() + residual.float() + lora) < TOL
    assert torch.equal(got[slot_ids == 0], (base + residual)[slot_ids == 0])


def test_engine_config_bounds_lora_kernel_rows() -> None:
    """The default covers decode steps of up to 64 rows; the bound does not depend on the cache's size (a
    small engine keeps the default)."""
    from persona_router.adapters.engine.config import EngineConfig
    from persona_router.core.errors import ConfigError

    assert EngineConfig().lora_kernel_rows == 64
    assert EngineConfig(max_batch=1, max_len=16).lora_kernel_rows == 64
    assert EngineConfig(lora_kernel_rows=0).lora_kernel_rows == 0
    for bad in (-1, (1 << 20) + 1):
        with pytest.raises(ConfigError, match="between 0 and") as info:
            EngineConfig(lora_kernel_rows=bad)
        assert info.value.field == "lora_kernel_rows"


def test_lora_shrink_tiling_rule() -> None:
    """16-row tiles up to 128 rows with enough K chunks for about 128 programs (at most 32), 64-row tiles for
    long prefills with fewer chunks."""
    assert lora_kernels.tiling_for(9) == (16, 32)
    assert lora_kernels.tiling_for(64) == (16, 32)
    assert lora_kernels.tiling_for(128) == (16, 16)
    assert lora_kernels.tiling_for(129) == (64, 32)
    assert lora_kernels.tiling_for(4096) == (64, 2)
    assert lora_kernels.tiling_for(1 << 16) == (64, 1)


def test_decode_attention_splits_positions_at_every_row_count() -> None:
    """The measured launch choice (``launch_for``): split over 32-position programs at every row count, 4 warps
    up to ``SPLIT_ROWS`` rows and 1 beyond (the 1-warp split form is one of the launches tested above)."""
    from persona_router.adapters.engine.attention_kernels import SPLIT_ROWS, Launch, launch_for

    assert launch_for(1) == launch_for(SPLIT_ROWS) == Launch(block=32, warps=4, split=True)
    assert launch_for(SPLIT_ROWS + 1) == launch_for(64) == Launch(block=32, warps=1, split=True)
    assert launch_for(64, kv_len=256) == Launch(block=32, warps=1, split=True)
    assert launch_for(64, kv_len=2048) == Launch(block=32, warps=4, split=True)  # a long cache: 4 warps merge


def test_decode_attention_steps_of_any_row_count_share_one_workspace() -> None:
    """Steps of 6, 3 and 5 rows of one cache (the default launches: 1 and 4 warps) against the reference, each
    twice; the split form's partial states all live in one buffer sized for the cache's rows."""
    from persona_router.adapters.engine import attention_kernels
    from persona_router.adapters.engine.nf4_kernels import Workspace

    rows, heads, dim, cache_len = 6, 4, 32, 96
    gen = torch.Generator().manual_seed(7)
    k_cache = torch.randn(rows, heads, cache_len, dim, generator=gen).to(_device()).to(_dtype())
    v_cache = torch.randn(rows, heads, cache_len, dim, generator=gen).to(_device()).to(_dtype())
    workspace = Workspace()
    for n in (6, 3, 5):
        q, k_new, v_new = (torch.randn(n, heads, dim, generator=gen).to(_device()).to(_dtype()) for _ in range(3))
        positions = torch.tensor([(17 * i + 5) % 90 for i in range(n)], device=_device())
        want = attention_kernels.reference(q, k_new, v_new, k_cache.clone(), v_cache.clone(), positions)[0]
        for _ in range(2):
            got = attention_kernels.decode_attention(q, k_new, v_new, k_cache, v_cache, positions, kv_len=96,
                                                     workspace=workspace)
            assert _rel(got, want) < TOL
    assert len([key for key in workspace._buffers if key[0] == "attention"]) == 1


@pytest.mark.slow  # about a minute of CPU: Triton's interpreter runs every kernel program in Python
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU machines; on CUDA the GPU "
                    "integration tests run the engine's kernel path")
def test_engine_with_kernels_matches_peft(tiny_model_dir: Any, engine_adapters: Any, peft_reference: Any) -> None:
    """The whole engine on its kernel path (gathered LoRA, live-length decode attention) in a mixed batch
    gives PEFT's greedy tokens (float32: on CPU the kernels run in Triton's interpreter)."""
    import asyncio

    engine = make_engine(tiny_model_dir, engine_adapters, max_batch=8, kernels="on")
    assert engine.runner.kernels
    cases = [(adapter, prompt) for prompt in prompts(peft_reference.tokenizer)[:2]
             for adapter in (None, *ADAPTER_SPECS)]

    async def body(engine: Any) -> list[list[int]]:
        handles = [engine.submit(request(f"r{i}", prompt, adapter, max_new_tokens=6))
                   for i, (adapter, prompt) in enumerate(cases)]
        return [generated(events) for events in await asyncio.gather(*(collect(h) for h in handles))]

    async def main() -> list[list[int]]:  # run_with's 60 s limit is too short for the interpreter on a busy CPU
        engine.start(asyncio.get_running_loop())
        try:
            return await asyncio.wait_for(body(engine), timeout=900)
        finally:
            engine.stop()

    for (adapter, prompt), tokens in zip(cases, asyncio.run(main()), strict=True):
        assert tokens == peft_reference.tokens(adapter, prompt, max_new_tokens=6), (adapter, prompt)
