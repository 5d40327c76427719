"""The decoder's pointwise pieces (RMSNorm, rotary embedding, gated activation), optionally compiled.

Written as plain torch they are several kernels each (RMSNorm alone is eight), and at small batch a
decode step is bound by how many kernels it launches, not by the GPU's arithmetic or bandwidth. On CUDA
``torch.compile`` fuses each into one kernel. Compilation is checked once per process against the eager
version on random inputs; if it fails or disagrees, the eager versions are used and the reason logged.
The eager versions are operation-for-operation Hugging Face's, which keeps CPU float32 outputs exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    import torch

    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def rotate(x: Any, cos: Any, sin: Any) -> Any:
    """Rotary embedding on the first ``cos.shape[-1]`` dims (Phi-3's partial rotary keeps the rest)."""
    import torch

    rotary = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    half = rotary // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat([(x_rot * cos) + (rotated * sin), x_pass], dim=-1)


def gated(activation: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def act_mul(gate_up: Any) -> Any:
        gate, up = gate_up.chunk(2, dim=-1)
        return up * activation(gate)

    return act_mul


@dataclass
class Pointwise:
    norm: Callable[[Any, Any, float], Any]
    rotate: Callable[[Any, Any, Any], Any]
    act_mul: Callable[[Any], Any]
    compiled: bool


_COMPILED: dict[tuple[str, str, str], Pointwise] = {}


def pointwise(activation: Callable[[Any], Any], *, compile_on: Any = None) -> Pointwise:
    """Eager helpers, or compiled ones for device ``compile_on`` (cached per process and dtype)."""
    eager = Pointwise(rms_norm, rotate, gated(activation), compiled=False)
    if compile_on is None:
        return eager
    device, dtype = compile_on
    key = (type(activation).__name__, str(device), str(dtype))
    if key not in _COMPILED:
        _COMPILED[key] = _compile_checked(eager, device, dtype)
    return _COMPILED[key]


def _compile_checked(eager: Pointwise, device: Any, dtype: Any) -> Pointwise:
    import torch

    try:
        fused = Pointwise(
            norm=torch.compile(eager.norm, dynamic=True, fullgraph=True),
            rotate=torch.compile(eager.rotate, dynamic=True, fullgraph=True),
            act_mul=torch.compile(eager.act_mul, dynamic=True, fullgraph=True),
            compiled=True,
        )
        problem = _disagreement(eager, fused, device, dtype)
    except Exception as exc:  # noqa: BLE001 - compile failures come as many types; eager is always correct
        log.warning("torch.compile of the pointwise kernels failed (%s: %s); running them eagerly",
                    type(exc).__name__, exc)
        return eager
    if problem:
        log.warning("compiled pointwise kernels disagree with eager (%s); running them eagerly", problem)
        return eager
    log.info("pointwise kernels compiled for %s %s", device, dtype)
    return fused


def _disagreement(eager: Pointwise, fused: Pointwise, device: Any, dtype: Any) -> str | None:
    """Compare on the shapes the engine uses (1 and several rows; decode and prefill broadcasting)."""
    import torch

    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    checks: list[tuple[str, Any, Any]] = []
    weight = rand(96)
    for rows in (1, 3, 8):
        x = rand(rows, 96)
        checks.append(("norm", eager.norm(x, weight, 1e-5), fused.norm(x, weight, 1e-5)))
        gate_up = rand(rows, 64)
        checks.append(("act_mul", eager.act_mul(gate_up), fused.act_mul(gate_up)))
        for rotary in (32, 24):  # full and partial rotary
            q, cos, sin = rand(rows, 4, 1, 32), rand(rows, 1, 1, rotary), rand(rows, 1, 1, rotary)
            checks.append(("rotate decode", eager.rotate(q, cos, sin), fused.rotate(q, cos, sin)))
            q, cos, sin = rand(rows, 4, 5, 32), rand(1, 1, 5, rotary), rand(1, 1, 5, rotary)
            checks.append(("rotate prefill", eager.rotate(q, cos, sin), fused.rotate(q, cos, sin)))
    for name, want, got in checks:
        if want.shape != got.shape or not torch.allclose(want.float(), got.float(), rtol=tol, atol=tol):
            return f"{name}: max abs diff {(want.float() - got.float()).abs().max().item():.3g}"
    return None
