"""The CUDA C++ one-row products of ``gemv="cuda"`` over their launch shapes, for ``kernels_gpu.py``.

``cuda_cases``: the 4-bit kernel (``nf4_gemv_cuda``) against the Triton K-major GEMV at the engine's measured
shape, on the same copies. ``dense_cases``: the dense kernel (``dense_gemv_cuda``) against cuBLAS on the same
bf16 weights, alone and as the engine runs a projection with a LoRA adapter and the residual (cuBLAS ``addmm``
then the expand kernel, against the kernel's own epilogue).
"""

from __future__ import annotations

import logging
from typing import Any

from benchmarks.kernels_gpu_timing import ROTATE_BYTES, SHAPES, best_config, quantized_copies, time_config

log = logging.getLogger("kernels_gpu")
SMS = 132  # an H200's multiprocessors


def cuda_shapes(n: int, k: int) -> list[Any]:
    """The CUDA GEMV's launch shapes tried: 4, 8 or 16 warps, each taking 1, 2 or 4 of a slice's 64-element
    blocks with every load first, or 4 or 8 with loads two blocks ahead (the slice count follows); and slice
    counts that make whole waves of blocks over an H200's SMs."""
    from persona_router.adapters.engine.nf4_gemv_cuda import CudaShape

    shapes = []
    for warps in (4, 8, 16):
        for per_warp, depth in ((1, 0), (2, 0), (4, 0), (4, 2), (8, 2)):
            shape = CudaShape(warps=warps, split_k=max(1, -(-(k // 64) // (warps * per_warp))), depth=depth)
            if shape.fits(n, k) and shape not in shapes:
                shapes.append(shape)
        # whole waves: splits that give about per_sm blocks on each of 132 SMs
        for per_sm in (2, 4, 6, 8) if warps < 16 else ():
            split = max(1, round(per_sm * SMS / -(-n // 128)))
            shape = CudaShape(warps=warps, split_k=split)
            if shape.fits(n, k) and shape not in shapes:
                shapes.append(shape)
    return shapes


def cuda_cases(bandwidth: float) -> list[dict[str, Any]]:
    """One row, per Phi-3-mini projection: the CUDA C++ GEMV (``nf4_gemv_cuda``) over its launch shapes against
    the Triton K-major GEMV at the engine's measured shape, on the same copies, in the same process; then both
    with a LoRA adapter and the residual in their epilogues."""
    import dataclasses

    import torch
    from persona_router.adapters.engine import nf4_gemv
    from persona_router.adapters.engine.nf4_gemv_cuda import default_shape
    from persona_router.adapters.engine.weights import Gemv4bit

    from tests.support.nf4 import FakeLinear4bit

    rows = []
    for name, (n, k) in SHAPES.items():
        nbytes = n * k // 2 + n * k // 64 * 4
        copies = quantized_copies(n, k, max(4, int(ROTATE_BYTES // nbytes) + 1))
        gemvs = [Gemv4bit.of(FakeLinear4bit(packed, state)) for packed, state, _ in copies]
        cuda = [nf4_gemv.kmajor(g.packed, g.absmax, g.code, n, k, torch.bfloat16, kernel="cuda") for g in gemvs]
        triton = [dataclasses.replace(w, kernel="triton",
                                      shape=nf4_gemv.measured_shape(torch.cuda.get_device_name(), n, k))
                  for w in cuda]
        del gemvs
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = nf4_gemv.reference(x, cuda[0])
        row: dict[str, Any] = {"shape": name, "n": n, "k": k, "bytes": nbytes, "copies": len(copies),
                               "floor_ms": nbytes / bandwidth * 1e3, "triton_shape": str(triton[0].shape),
                               "triton": time_config(lambda w, x=x: nf4_gemv.gemv(x, w), triton, want, nbytes),
                               "default": str(default_shape(n, k)), "configs": {}}
        for shape in cuda_shapes(n, k):
            row["configs"][str(shape)] = time_config(lambda w, t=shape, x=x: nf4_gemv.gemv(x, w, shape=t), cuda,
                                                     want, nbytes)
        row["best"] = best_config(row["configs"])
        shrunk, residual, lora = _lora_inputs(x, n, k)
        epi_want = nf4_gemv.reference(x, cuda[0], residual=residual).float() + lora
        for label, layouts in (("cuda_epilogue", cuda), ("triton_epilogue", triton)):
            row[label] = time_config(lambda w, x=x, r=residual, s=shrunk: nf4_gemv.gemv(x, w, residual=r, lora=s),
                                     layouts,
                                     epi_want, nbytes)
        rows.append(row)
        log.info("cuda %s: floor %.4f triton %s best %s", name, row["floor_ms"], row["triton"], row["best"])
        del copies, cuda, triton
        torch.cuda.empty_cache()
    return rows


def _lora_inputs(x: Any, n: int, k: int) -> tuple[Any, Any, Any]:
    """A shrunk r=16 adapter at slot 3 (``lora_kernels.shrink``), the residual, and their float32 sum's LoRA
    part (``lora_kernels.reference``)."""
    import torch
    from persona_router.adapters.engine import lora_kernels

    capacity, rank = 8, 16
    a = torch.randn(capacity, rank, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    bt = torch.randn(capacity, rank, n, device="cuda", dtype=torch.bfloat16) * 0.02
    scaling = torch.full((capacity + 1,), 2.0, device="cuda", dtype=torch.bfloat16)
    slots = torch.tensor([3], device="cuda")
    shrunk = lora_kernels.shrink(x, a, bt, slots, scaling, m=4)
    residual = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    return shrunk, residual, lora_kernels.reference(x, a, bt, slots, scaling).float()


def dense_cases(bandwidth: float) -> list[dict[str, Any]]:
    """One row on a dense bf16 weight, per Phi-3-mini projection: the CUDA GEMV over its launch shapes against
    cuBLAS (``F.linear``), then each with the residual and a LoRA adapter as the engine runs them."""
    import torch
    import torch.nn.functional as F
    from persona_router.adapters.engine import lora_kernels
    from persona_router.adapters.engine.dense_gemv_cuda import DenseShape, dense_gemv

    rows = []
    for name, (n, k) in SHAPES.items():
        nbytes = 2 * n * k
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                   for _ in range(max(3, int(ROTATE_BYTES // nbytes) + 1))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = x.float() @ weights[0].float().T
        row: dict[str, Any] = {"shape": name, "n": n, "k": k, "bytes": nbytes, "copies": len(weights),
                               "floor_ms": nbytes / bandwidth * 1e3,
                               "cublas": time_config(lambda w, x=x: F.linear(x, w), weights, want, nbytes),
                               "configs": {}}
        for warps in (2, 4, 8, 16):
            for per_warp in (1, 2, 4):
                shape = DenseShape(warps, per_warp)
                row["configs"][str(shape)] = time_config(lambda w, t=shape, x=x: dense_gemv(x, w, shape=t),
                                                         weights, want, nbytes)
        row["best"] = best_config(row["configs"])
        shrunk, residual, lora = _lora_inputs(x, n, k)
        epi_want = want + residual.float() + lora
        row["cuda_epilogue"] = time_config(lambda w, x=x, r=residual, s=shrunk: dense_gemv(x, w, residual=r,
                                                                                           lora=s),
                                           weights, epi_want, nbytes)
        row["cublas_addmm_then_expand"] = time_config(
            lambda w, x=x, r=residual, s=shrunk: lora_kernels.expand_(torch.addmm(r, x, w.t()), s, None),
            weights, epi_want, nbytes)
        rows.append(row)
        log.info("dense %s: floor %.4f cublas %s best %s", name, row["floor_ms"], row["cublas"], row["best"])
        del weights
        torch.cuda.empty_cache()
    return rows


def _us(entry: dict[str, Any] | None) -> str:
    return f"{(entry or {}).get('ms', float('nan')) * 1e3:.1f}"


def cuda_summary(report: dict[str, Any]) -> list[str]:
    """One line per projection of the ``cuda`` and ``dense`` sections (what ``kernels_gpu.py`` prints last)."""
    lines = []
    for key in ("cuda", "dense"):
        for row in report.get(key) if isinstance(report.get(key), list) else []:
            best = row.get("best") or {}
            head = f"{key} {row['shape']:8s} floor {row['floor_ms'] * 1e3:.1f} us | "
            found = f"cuda best {best.get('config')} {_us(best)} us {best.get('tb_s', 0):.2f} TB/s"
            if key == "cuda":
                lines.append(f"{head}triton {row['triton_shape']} {_us(row['triton'])} us | {found} | epilogue cuda "
                             f"{_us(row['cuda_epilogue'])} triton {_us(row['triton_epilogue'])} us")
            else:
                lines.append(f"{head}cublas {_us(row['cublas'])} us | {found} | with LoRA + residual: cuda "
                             f"{_us(row['cuda_epilogue'])} cublas addmm + expand "
                             f"{_us(row['cublas_addmm_then_expand'])} us")
    return lines
