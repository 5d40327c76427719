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
  backward runs the same compiled forward. Dropout masks match between the forward and the recomputation
  because checkpointing restores the RNG state before it recomputes, and the compiled graph draws its random
  seeds from that state (tests/unit/test_training_compile.py checks the gradients against an uncheckpointed run);
- compilation is lazy: nothing is traced until the first forward, so PEFT's LoRA layers, injected later by
  TRL, are part of the graph. The first micro-batches pay the compilation (tens of seconds per distinct shape
  signature: the second length seen makes the sequence dimension dynamic, and evaluation traces its own graph).
"""

from __future__ import annotations

import logging
from typing import Any

from persona_router.core.errors import ConfigError

log = logging.getLogger(__name__)

# Graphs one layer may need: training and evaluation, each with a first static and then a dynamic sequence
# length, plus the padded evaluation batches' mask path. Dynamo's default (8) would be enough for one layer,
# but a run that exceeds it silently falls back to eager code, so a little headroom is kept.
RECOMPILE_LIMIT = 16


def compile_decoder_layers(model: Any) -> int:
    """Mark every decoder layer of ``model`` for compilation at its first call; returns how many were marked."""
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
    log.info("compiling %d decoder layers of %s on first use", len(layers), type(model).__name__)
    return len(layers)


def _raise_recompile_limit(torch: Any) -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6; older names stay as aliases
        if hasattr(config, name) and getattr(config, name) < RECOMPILE_LIMIT:
            setattr(config, name, RECOMPILE_LIMIT)
