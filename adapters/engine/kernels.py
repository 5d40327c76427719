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


@dataclass(frozen=True)
class Shapes:
    """The model dimensions the pointwise kernels see (their compiled variants are made for these)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary: int


_COMPILED: dict[tuple[str, str, str, Shapes], Pointwise] = {}


def pointwise(activation: Callable[[Any], Any], *, compile_on: Any = None, shapes: Shapes | None = None) -> Pointwise:
    """Eager helpers, or compiled ones for ``compile_on = (device, dtype)`` (cached per process)."""
    eager = Pointwise(rms_norm, rotate, gated(activation), compiled=False)
    if compile_on is None or shapes is None:
        return eager
    device, dtype = compile_on
    key = (type(activation).__name__, str(device), str(dtype), shapes)
    if key not in _COMPILED:
        _COMPILED[key] = _compile_checked(eager, device, dtype, shapes)
    return _COMPILED[key]


def _compile_checked(eager: Pointwise, device: Any, dtype: Any, shapes: Shapes) -> Pointwise:
    import torch

    try:
        # Not fullgraph: past dynamo's recompile limit a function runs eagerly instead of failing.
        raw = Pointwise(norm=torch.compile(eager.norm, dynamic=True), rotate=torch.compile(eager.rotate, dynamic=True),
                        act_mul=torch.compile(eager.act_mul, dynamic=True), compiled=True)
        problem = _disagreement(eager, raw, device, dtype, shapes)
    except Exception as exc:  # noqa: BLE001 - compile failures come as many types; eager is always correct
        log.warning("torch.compile of the pointwise kernels failed (%s: %s); running them eagerly",
                    type(exc).__name__, exc)
        return eager
    if problem:
        log.warning("compiled pointwise kernels disagree with eager (%s); running them eagerly", problem)
        return eager
    log.info("pointwise kernels compiled for %s %s", device, dtype)
    return Pointwise(norm=_Fallback(raw.norm, eager.norm, "norm"), rotate=_Fallback(raw.rotate, eager.rotate, "rotate"),
                     act_mul=_Fallback(raw.act_mul, eager.act_mul, "act_mul"), compiled=True)


class _Fallback:
    """A compiled function that turns into its eager twin for good if a later (re)compilation fails."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any], name: str) -> None:
        self.compiled, self.eager, self.name = compiled, eager, name
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - recompilation errors come as many types
                log.warning("compiled %s failed (%s: %s); using the eager version from now on", self.name,
                            type(exc).__name__, exc)
                self.failed = True
        return self.eager(*args)


def _disagreement(eager: Pointwise, fused: Pointwise, device: Any, dtype: Any, shapes: Shapes) -> str | None:
    """Compare on the model's shapes, under inference mode as the engine runs: this also compiles the
    one-row and many-row variants up front, outside any CUDA graph capture."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    weight = rand(shapes.hidden)  # like the model's weights: made outside inference mode
    with torch.inference_mode():
        return _compare(eager, fused, dtype, shapes, rand, weight)


def _compare(eager: Pointwise, fused: Pointwise, dtype: Any, shapes: Shapes, rand: Callable[..., Any],
             weight: Any) -> str | None:
    import torch

    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    checks: list[tuple[str, Any, Any]] = []
    dim, q_width, kv_width = shapes.head_dim, shapes.heads * shapes.head_dim, shapes.kv_heads * shapes.head_dim
    for rows in (1, 3, 8):
        x = rand(rows, shapes.hidden)
        checks.append(("norm", eager.norm(x, weight, 1e-5), fused.norm(x, weight, 1e-5)))
        gate_up = rand(rows, 2 * shapes.intermediate)
        checks.append(("act_mul", eager.act_mul(gate_up), fused.act_mul(gate_up)))
        # Query and key are views into the fused qkv output, as in the forward pass (same strides).
        qkv = rand(rows, q_width + 2 * kv_width)
        cos, sin = rand(rows, 1, shapes.rotary), rand(rows, 1, shapes.rotary)
        for name, view in (("rotate q", qkv[:, :q_width].view(rows, shapes.heads, dim)),
                           ("rotate k", qkv[:, q_width:q_width + kv_width].view(rows, shapes.kv_heads, dim))):
            checks.append((name, eager.rotate(view, cos, sin), fused.rotate(view, cos, sin)))
    for name, want, got in checks:
        if want.shape != got.shape or not torch.allclose(want.float(), got.float(), rtol=tol, atol=tol):
            return f"{name}: max abs diff {(want.float() - got.float()).abs().max().item():.3g}"
    return None
