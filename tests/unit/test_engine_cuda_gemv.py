"""The CUDA C++ one-row products (``nf4_gemv_cuda`` on the K-major 4-bit copy, ``gemv="cuda"``;
``dense_gemv_cuda`` on a dense 16-bit weight, ``dense_gemv``) and their run-time compiler (``cuda_rtc``).

On CPU: the kernel's source, for every epilogue and both 16-bit types, compiles with NVRTC for Hopper (the
``nvidia-cuda-nvrtc`` wheel of the dev extra; no GPU needed) and carries the decode PTX that
``test_engine_nf4_gemv.py`` executes in Python; launch-shape rules and refusals. On CUDA (``gpu``): the kernel
against the plain-PyTorch float32 reference at odd shapes (N not a multiple of 128, K a multiple of 64 but not
of 512, uneven split-K slices, warps with nothing to do), with the residual and LoRA in its epilogue, in float16,
and replayed from a CUDA graph (split-K counters back at zero after every launch); the dense kernel likewise
against ``x @ W^T`` in float32.
"""

from __future__ import annotations

from typing import Any

import pytest
from persona_router.adapters.engine import cuda_rtc, dense_gemv_cuda, nf4_dot_asm
from persona_router.adapters.engine.nf4_gemv_cuda import KERNEL, CudaShape, default_shape, dot_asm, source
from persona_router.core.errors import ConfigError

from tests.unit.test_engine_nf4_gemv import NF4

needs_nvrtc = pytest.mark.skipif(not cuda_rtc.available(),
                                 reason=f"no NVRTC library to compile with: {cuda_rtc.INSTALL_HINT}")


def test_dot_asm_takes_cuda_operands() -> None:
    text = dot_asm(nf4_dot_asm.ptx(NF4, "bf16", "bnb"))
    for operand in range(10):
        assert f"%{operand}," in text or f"%{operand};" in text or f"%{operand}\\n" in text
    assert "$" not in text and "%%q_" in text and "%q_" not in text.replace("%%q_", "")
    assert text.count("fma.rn.bf16x2") == 4


def test_shape_rules() -> None:
    assert default_shape(9216, 3072) == CudaShape(warps=8, split_k=6)
    assert default_shape(3072, 8192) == CudaShape(warps=8, split_k=16)
    assert default_shape(148, 320) == CudaShape(warps=8, split_k=1)  # 5 blocks of 64: warps 5-7 have none
    assert CudaShape(8, 6).blocks_per_warp(3072) == 1
    assert CudaShape(4, 3).blocks_per_warp(3072) == 4
    assert not CudaShape(4, 1).fits(9216, 3072)  # 12 blocks per warp, all loaded at once: too many registers
    assert CudaShape(4, 1, depth=2).fits(9216, 3072) and not CudaShape(4, 1, depth=5).fits(9216, 3072)
    assert not CudaShape(1 * 4, 1, depth=2).fits(9216, 8192)  # 32 blocks per warp
    assert not CudaShape(8, 6).fits(9218, 3072)  # rows load four at a time
    assert not CudaShape(8, 6).fits(9216, 3000)
    assert not CudaShape(6, 6).fits(9216, 3072)
    assert not CudaShape(8, 49).fits(9216, 3072)  # more slices than 64-element blocks


@needs_nvrtc
@pytest.mark.parametrize("dtype", nf4_dot_asm.DTYPES)
@pytest.mark.parametrize(("k", "shape", "rank", "res"), [(3072, CudaShape(8, 6), 16, True),
                                                          (8192, CudaShape(8, 16), 0, True),
                                                          (3072, CudaShape(4, 3), 5, False),
                                                          (320, CudaShape(16, 1), 0, False)])
def test_source_compiles_for_hopper(dtype: str, k: int, shape: CudaShape, rank: int, res: bool) -> None:
    code = source(dot_asm(nf4_dot_asm.ptx(NF4, dtype, "bnb")), dtype == "f16", k, shape, rank, 2, res, rank > 0)
    ptx = cuda_rtc.compile_ptx(code, KERNEL, "90")
    assert f".entry {KERNEL}(" in ptx
    assert ptx.count(f"fma.rn.{dtype}x2") == 4 * 8 * 4 * shape.blocks_per_warp(k)  # every word of every block
    assert ptx.count("ld.global.nc.v4.u32") >= 8 * shape.blocks_per_warp(k)
    assert ("atom.global.add" in ptx) == (shape.split_k > 1)
    assert len(cuda_rtc.compile_cubin(code, KERNEL, "90")) > 0


@needs_nvrtc
@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize(("k", "shape", "rank"), [(3072, dense_gemv_cuda.DenseShape(8, 2), 16),
                                                  (8192, dense_gemv_cuda.DenseShape(4, 1), 0),
                                                  (256, dense_gemv_cuda.DenseShape(2, 4), 3),
                                                  (328, dense_gemv_cuda.DenseShape(8, 2), 3)])
def test_dense_source_compiles_for_hopper(f16: bool, k: int, shape: Any, rank: int) -> None:
    code = dense_gemv_cuda.source(f16, k, shape, rank, 2, True, rank > 0)
    ptx = cuda_rtc.compile_ptx(code, dense_gemv_cuda.KERNEL, "90")
    assert f".entry {dense_gemv_cuda.KERNEL}(" in ptx
    # every 16-byte load of every row the warp owns: K / 256 per lane and row
    assert ptx.count("ld.global.cs.v4.u32") == shape.rows_per_warp * -(-k // 256)
    assert ptx.count("fma.rn.f32") >= shape.rows_per_warp * k // 32


def test_dense_shape_rules() -> None:
    shape = dense_gemv_cuda.DenseShape
    assert shape().fits(9216, 3072) and shape(4, 1).fits(3, 8192)
    assert not shape().fits(9216, 3004)  # 16-byte loads of eight elements
    assert not shape(3, 2).fits(9216, 3072) and not shape(8, 3).fits(9216, 3072)


@needs_nvrtc
def test_compile_errors_carry_nvrtc_log() -> None:
    with pytest.raises(RuntimeError, match="could not compile broken"):
        cuda_rtc.compile_ptx('extern "C" __global__ void broken() { undeclared = 1; }', "broken", "90")


def test_missing_nvrtc_is_a_config_error(monkeypatch: Any) -> None:
    import ctypes

    def refuse(name: str, *args: Any, **kwargs: Any) -> Any:
        raise OSError(name)

    cuda_rtc.nvrtc.cache_clear()
    monkeypatch.setattr(ctypes, "CDLL", refuse)
    try:
        with pytest.raises(ConfigError, match="nvidia-cuda-nvrtc"):
            cuda_rtc.nvrtc()
        assert not cuda_rtc.available()
    finally:
        monkeypatch.undo()
        cuda_rtc.nvrtc.cache_clear()


def test_engine_config_takes_the_cuda_gemv() -> None:
    from persona_router.adapters.engine.config import EngineConfig

    assert EngineConfig(gemv="cuda").gemv == "cuda"
    assert EngineConfig(dense_gemv="auto").dense_gemv == "auto"
    with pytest.raises(ConfigError, match="gemv"):
        EngineConfig(gemv="cutlass")
    with pytest.raises(ConfigError, match="dense_gemv"):
        EngineConfig(dense_gemv="yes")


# -- on the GPU -----------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


def _layout(n: int, k: int, seed: int, dtype: Any = None) -> Any:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from persona_router.adapters.engine import nf4_gemv

    gen = torch.Generator().manual_seed(seed)
    dense = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16).cuda()
    packed, state = bnbf.quantize_4bit(dense, blocksize=64, compress_statistics=True, quant_type="nf4",
                                       quant_storage=torch.uint8)
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    layout = nf4_gemv.kmajor(packed, absmax, state.code, n, k, dtype or torch.bfloat16, kernel="cuda")
    assert layout is not None and layout.kernel == "cuda"
    return layout


def _rel(got: Any, want: Any) -> float:
    assert not torch.isnan(got).any()
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_cpu_tensors_are_refused() -> None:
    from persona_router.adapters.engine import nf4_gemv
    from persona_router.adapters.engine.nf4_gemv_cuda import gemv_cuda

    w = nf4_gemv.KMajor(words=None, scales=None, code=None, table=None, n=8, k=64, asm="", f16=False,
                        kernel="cuda")
    with pytest.raises(ValueError, match="CUDA device"):
        gemv_cuda(torch.zeros(1, 64, dtype=torch.bfloat16), w)


GPU_SHAPES = [(148, 320, None), (148, 320, CudaShape(4, 2)), (260, 1024, CudaShape(8, 3)),
              (1024, 3072, None), (1024, 3072, CudaShape(4, 3)), (512, 8192, None), (384, 8192, CudaShape(16, 4))]


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k", "shape"), GPU_SHAPES)
def test_cuda_gemv_matches_reference(n: int, k: int, shape: CudaShape | None) -> None:
    """Alone, with the residual, with residual and LoRA; twice each (split-K counters back at zero)."""
    from persona_router.adapters.engine import lora_kernels, nf4_gemv

    layout = _layout(n, k, seed=n + k)
    capacity, rank = 4, 5
    a = torch.randn(capacity, rank, k, device="cuda").to(torch.bfloat16) / k ** 0.5
    bt = (torch.randn(capacity, rank, n, device="cuda") * 0.05).to(torch.bfloat16)
    scaling = torch.full((capacity + 1,), 2.0, device="cuda", dtype=torch.bfloat16)
    for slot in (3, 0):  # an adapter, then no adapter (slot 0: the epilogue adds nothing)
        x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
        residual = torch.randn(1, n, device="cuda").to(torch.bfloat16)
        slots = torch.tensor([slot], device="cuda")
        assert _rel(nf4_gemv.gemv(x, layout, shape=shape), nf4_gemv.reference(x, layout)) < 1e-2
        want = nf4_gemv.reference(x, layout, residual=residual)
        assert _rel(nf4_gemv.gemv(x, layout, residual=residual, shape=shape), want) < 1e-2
        shrunk = lora_kernels.shrink(x, a, bt, slots, scaling, m=capacity)
        want = want.float() + lora_kernels.reference(x, a, bt, slots, scaling)
        assert _rel(nf4_gemv.gemv(x, layout, residual=residual, lora=shrunk, shape=shape), want) < 1e-2


@pytest.mark.gpu
def test_cuda_gemv_float16_and_agrees_with_triton_gemv() -> None:
    from persona_router.adapters.engine import nf4_gemv

    layout = _layout(1024, 3072, seed=5, dtype=torch.float16)
    x = torch.randn(1, 3072, device="cuda").to(torch.float16)
    assert _rel(nf4_gemv.gemv(x, layout), nf4_gemv.reference(x, layout)) < 1e-2
    with pytest.raises(ValueError, match="laid out for"):
        nf4_gemv.gemv(x.to(torch.bfloat16), layout)
    triton = nf4_gemv.KMajor(**{**vars(layout), "kernel": "triton", "shape": None})
    assert _rel(nf4_gemv.gemv(x, layout), nf4_gemv.gemv(x, triton)) < 2e-3  # same decode, other sum order


@pytest.mark.gpu
def test_cuda_gemv_replays_from_a_graph() -> None:
    """Captured with split K and the epilogue, replayed on new inputs three times: each replay equals an eager
    launch on the same inputs (the counters are reset by the launch itself, not by the host)."""
    from persona_router.adapters.engine import nf4_gemv

    layout = _layout(3072, 8192, seed=9)
    x = torch.randn(1, 8192, device="cuda").to(torch.bfloat16)
    residual = torch.randn(1, 3072, device="cuda").to(torch.bfloat16)
    nf4_gemv.gemv(x, layout, residual=residual)  # compile and allocate outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = nf4_gemv.gemv(x, layout, residual=residual)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, nf4_gemv.gemv(x, layout, residual=residual))
        assert _rel(out, nf4_gemv.reference(x, layout, residual=residual)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k", "shape"), [(131, 256, None), (9, 768, dense_gemv_cuda.DenseShape(2, 4)),
                                               (70, 328, None), (64, 64, dense_gemv_cuda.DenseShape(16, 1)),
                                               (1000, 3072, dense_gemv_cuda.DenseShape(4, 1)),
                                               (300, 8192, None)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dense_gemv_matches_reference(n: int, k: int, shape: Any, dtype: str) -> None:
    """N not a multiple of the rows per block, warps past the last row, K not a multiple of 256 (lanes past
    K in the last step); alone, with the residual, with residual
    and LoRA (slot 3, then no adapter), against float32 products rounded once."""
    from persona_router.adapters.engine import lora_kernels
    from persona_router.adapters.engine.dense_gemv_cuda import dense_gemv

    dt = getattr(torch, dtype)
    weight = (torch.randn(n, k, device="cuda") * 0.05).to(dt)
    capacity, rank = 4, 5
    a = torch.randn(capacity, rank, k, device="cuda").to(dt) / k ** 0.5
    bt = (torch.randn(capacity, rank, n, device="cuda") * 0.05).to(dt)
    scaling = torch.full((capacity + 1,), 2.0, device="cuda", dtype=dt)
    for slot in (3, 0):
        x = torch.randn(1, k, device="cuda").to(dt)
        residual = torch.randn(1, n, device="cuda").to(dt)
        base = x.float() @ weight.float().T
        assert _rel(dense_gemv(x, weight, shape=shape), base) < 5e-3
        assert _rel(dense_gemv(x, weight, residual=residual, shape=shape), base + residual.float()) < 5e-3
        shrunk = lora_kernels.shrink(x, a, bt, torch.tensor([slot], device="cuda"), scaling, m=capacity)
        want = base + residual.float() + lora_kernels.reference(x, a, bt, torch.tensor([slot], device="cuda"),
                                                                scaling).float()
        assert _rel(dense_gemv(x, weight, residual=residual, lora=shrunk, shape=shape), want) < 5e-3


@pytest.mark.gpu
def test_dense_gemv_refuses_what_it_cannot_read() -> None:
    from persona_router.adapters.engine.dense_gemv_cuda import dense_gemv, runs

    weight = torch.randn(64, 512, device="cuda").to(torch.bfloat16)
    assert runs(weight) and not runs(weight.float()) and not runs(weight[:, :300].contiguous()) and not runs(weight.t())
    with pytest.raises(ValueError, match="x must be"):
        dense_gemv(torch.zeros(2, 512, device="cuda", dtype=torch.bfloat16), weight)
    with pytest.raises(ValueError, match="residual"):
        dense_gemv(torch.zeros(1, 512, device="cuda", dtype=torch.bfloat16), weight,
                   residual=torch.zeros(1, 63, device="cuda", dtype=torch.bfloat16))


def test_epilogue_operands_and_refusals() -> None:
    """The two kernels' shared epilogue: absent operands are stood in for by ``out``; a residual or LoRA
    operand the kernels cannot read is refused before any launch (CPU tensors suffice)."""
    from types import SimpleNamespace

    from persona_router.adapters.engine import cuda_epilogue

    out, res = torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(1, 8, dtype=torch.bfloat16)
    lora = SimpleNamespace(t=torch.zeros(2, 1, 16), bt=torch.zeros(3, 16, 8, dtype=torch.bfloat16),
                           slot_ids=torch.ones(1, dtype=torch.int64), rank=16, splits=2)
    pointers, strides = cuda_epilogue.operands(out, None, None)
    assert all(p is out for p in pointers) and strides == [0, 0, 0]
    pointers, strides = cuda_epilogue.operands(out, res, lora)
    assert pointers == [res, lora.t, lora.bt, lora.slot_ids] and strides == [16, 128, 8]
    assert cuda_epilogue.variant(res, lora) == (16, 2, True, True)
    assert cuda_epilogue.variant(None, None) == (0, 1, False, False)
    cuda_epilogue.check(8, torch.bfloat16, res, lora)
    with pytest.raises(ValueError, match="residual must be a row-major"):
        cuda_epilogue.check(8, torch.bfloat16, torch.zeros(1, 7, dtype=torch.bfloat16), None)
    with pytest.raises(ValueError, match="LoRA epilogue"):
        cuda_epilogue.check(8, torch.bfloat16, None, SimpleNamespace(**{**vars(lora), "slot_ids": torch.ones(1)}))
