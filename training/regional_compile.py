"""``torch.compile`` of each decoder layer ("regional" compilation), set up on a loaded base before TRL wraps it.

Why: a QLoRA step on a GPU is mostly host time. Each decoder layer runs four LoRA-wrapped 4-bit projections
(PEFT's Python forward, bitsandbytes' dequantise + matmul, dropout, the two LoRA products, scaling, a defensive
clone, the add), RoPE, attention, two norms and the residual adds: hundreds of small kernel launches and Python
frames per layer, three times per micro-batch (forward, recomputation, backward). A compiled layer is one call
into generated code with the element-wise work fused into a few Triton kernels.

How:

- one layer at a time (``nn.Module.compile``), not the whole model: the layers are identical, so Dynamo traces
  one graph that every layer reuses (their parameters are graph inputs), which keeps compilation to one layer's
  worth, and the embedding, the LM head and TRL's fused loss stay as they are;
- gradient checkpointing stays outside the compiled region: transformers' ``GradientCheckpointingLayer.__call__``
  wraps ``Module.__call__``, which dispatches to the compiled implementation, so the recomputation in the
  backward runs compiled code too. Dropout masks match between the forward and the recomputation because
  checkpointing restores the RNG state before it recomputes, and the compiled graphs draw their random seeds
  from that state (tests/unit/test_training_compile.py checks the gradients against an uncheckpointed run, for
  both checkpointing implementations: non-reentrant runs one graph twice, reentrant a gradient-free forward
  graph and then a training graph);
- one graph per grad mode, compiled in the first micro-batch: packed rows change length with every batch, and
  Dynamo would compile a static graph first and a dynamic one at the first new length, then again at the first
  new example count. Before each call the sequence dimension of the layer's inputs (hidden states, positions,
  RoPE tables, the mask) and the example-boundary tensors are marked dynamic, and the longest-example bound
  handed to the attention kernel is the configured ``max_length`` (an upper bound is what FlashAttention's
  variable-length kernel needs: it sizes its grid with it and stops at each example's real end), so the one
  graph serves every batch. ``benchmarks/train_gpu.py`` records how many graphs were built in each step.
- compilation is lazy: nothing is traced until the first forward, so PEFT's LoRA layers, injected later by
  TRL, are part of the graph.
"""

from __future__ import annotations

import logging
from typing import Any

from persona_router.core.errors import ConfigError

log = logging.getLogger(__name__)

# Graphs one layer may need: training (one per checkpointing grad mode) and evaluation (packed and padded
# batches). Dynamo's default (8) would be enough for one layer, but a run that exceeds it silently falls back to
# eager code, so a little headroom is kept.
RECOMPILE_LIMIT = 16
# Keyword inputs that hold one entry per example boundary (TRL's padding-free collator): dynamic in dimension 0.
BOUNDARY_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k")
BOUND_KWARGS = ("max_length_q", "max_length_k")


def compile_decoder_layers(model: Any, *, max_length: int | None = None) -> int:
    """Mark every decoder layer of ``model`` for compilation at its first call; returns how many were marked.

    ``max_length``: the longest example a packed batch can hold (the training ``max_length``); None keeps the
    batch's own value, which Dynamo then specialises on until it changes once.
    """
    try:
        import torch
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError as exc:  # pragma: no cover - both ship with the training extra
        raise ConfigError("compile_layers=on needs torch and transformers", field="compile_layers") from exc
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no decoder layers transformers can checkpoint; "
                          "set compile_layers=off", field="compile_layers")
    _raise_recompile_limit(torch)
    for layer in layers:
        layer.compile()
        compiled = getattr(layer, "_compiled_call_impl", None)
        if compiled is None:  # pragma: no cover - a torch whose Module.compile stores the callable elsewhere
            log.warning("cannot mark the sequence dimension dynamic on this torch; expect one recompilation")
            continue
        layer._compiled_call_impl = DynamicSequenceCall(compiled, max_length)
    log.info("compiling %d decoder layers of %s on first use (sequence dimension dynamic, example bound %s)",
             len(layers), type(model).__name__, max_length)
    return len(layers)


class DynamicSequenceCall:
    """Calls a compiled layer with its packed-sequence dimensions marked dynamic (see the module docstring)."""

    def __init__(self, compiled: Any, max_length: int | None) -> None:
        self.compiled = compiled
        self.max_length = max_length

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
            length = int(hidden.shape[1])
            torch._dynamo.maybe_mark_dynamic(hidden, 1)
            for value in (*args[1:], *kwargs.values()):
                _mark_sequence(value, length, torch)
            for name in BOUNDARY_KWARGS:
                value = kwargs.get(name)
                if isinstance(value, torch.Tensor) and value.dim() == 1:
                    torch._dynamo.maybe_mark_dynamic(value, 0)
        if self.max_length is not None:
            for name in BOUND_KWARGS:
                value = kwargs.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value <= self.max_length:
                    kwargs = {**kwargs, name: self.max_length}
        return self.compiled(*args, **kwargs)


def _mark_sequence(value: Any, length: int, torch: Any) -> None:
    """Positions, RoPE tables and per-token indices are (1, S, ...); a dense mask is (B, 1, S, S)."""
    if isinstance(value, tuple | list):
        for item in value:
            _mark_sequence(item, length, torch)
        return
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return
    if value.dim() == 4 and value.shape[-1] == length and value.shape[-2] == length:
        torch._dynamo.maybe_mark_dynamic(value, [2, 3])
    elif value.shape[1] == length:
        torch._dynamo.maybe_mark_dynamic(value, 1)


def _raise_recompile_limit(torch: Any) -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6; older names stay as aliases
        if hasattr(config, name) and getattr(config, name) < RECOMPILE_LIMIT:
            setattr(config, name, RECOMPILE_LIMIT)
