"""Training speed-ups applied to a loaded base before TRL wraps it; Liger and offloading are CUDA-only.

Three switches of :class:`TrainConfig` land here (``activation_offloading`` and ``deferred_metrics`` are set in
``sft_setup.py``; ``compile_layers`` is ``training/regional_compile.py``, ``offload_layers``
``training/offload.py``):

- ``attention="varlen"``: packed rows are one flat sequence of several examples (TRL's padding-free collator).
  With SDPA, transformers turns their restarting ``position_ids`` into a dense ``(S, S)`` block-diagonal mask,
  and SDPA then runs a masked kernel over the whole square, most of which is masked out. ``varlen`` calls
  PyTorch's own variable-length FlashAttention kernel (``torch.nn.attention.varlen``) with the example
  boundaries that TRL's collator computes on the host (``cu_seq_lens_q``), so each example attends causally
  to itself only and no mask is read. Batches without those boundaries (padded eval batches, other callers)
  take the ordinary SDPA path with transformers' mask, so the model stays correct for any input.
  On CPU the same boundaries drive one causal SDPA call per example (:func:`per_example_sdpa`), which skips
  the masked-out part of the square: the trainer ran 7-8% faster than with the masked call
  (``benchmarks/results/train_cpu_throughput_varlen.json``).
- ``liger_kernels="on"``: Liger's fused RMSNorm and SwiGLU (Triton) on this model instance only. Liger also
  patches RoPE, but only as a module-level function that would change every model of the architecture in the
  process (CPU ones too), so RoPE stays as it is, and the module-level classes Liger swaps are put back.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import sys
from collections.abc import Callable
from typing import Any

from persona_router.core.errors import ConfigError

log = logging.getLogger(__name__)

VARLEN_ATTENTION = "persona_varlen"

# A kernel over packed (T, H, D) tensors: (q, k, v, cu_seqlens, max_len, scale, left_window) -> (T, H, D).
PackedKernel = Callable[[Any, Any, Any, Any, int, float, int], Any]


def prepare_model(model: Any, config: Any, device: str) -> dict[str, str]:
    """Apply ``config``'s speed settings to ``model`` in place; returns what was applied, for the log.

    ``config`` must be resolved for ``device``. Every setting is checked before the model is touched.
    """
    _check(config, device)
    applied: dict[str, str] = {}
    if config.attention == "varlen":
        model.set_attn_implementation(register_varlen_attention())
        applied["attention"] = ("varlen (torch.nn.attention.varlen, FlashAttention kernels)" if device == "cuda"
                                else "varlen (one causal SDPA call per packed example)")
    elif config.attention in ("sdpa", "eager"):
        model.set_attn_implementation(config.attention)
        applied["attention"] = config.attention
    if config.liger_kernels == "on":
        applied["liger_kernels"] = apply_liger(model)
    if config.compile_layers == "on":
        from persona_router.training.regional_compile import compile_decoder_layers

        # Packed rows hold whole examples of at most max_length tokens: that bound keeps one graph per grad mode.
        bound = config.max_length if config.packing else None
        applied["compile_layers"] = (f"torch.compile of {compile_decoder_layers(model, max_length=bound)} "
                                     "decoder layers")
    if config.offload_layers:
        from persona_router.training.offload import offload_first_layers

        moved = offload_first_layers(model, config.offload_layers).count
        applied["offload_layers"] = f"checkpointed inputs of the first {moved} layers in host memory"
    if applied:
        log.info("training speed settings: %s", applied)
    return applied


def _check(config: Any, device: str) -> None:
    if config.attention == "varlen":
        if not config.packing:
            raise ConfigError("varlen attention is for packed rows; set packing=true or attention='sdpa'",
                              field="attention")
        if device == "cuda" and _torch_varlen() is None:
            raise ConfigError("this torch has no torch.nn.attention.varlen (torch >= 2.10 has it); use 'sdpa'",
                              field="attention")
    if config.liger_kernels == "on" and device != "cuda":
        raise ConfigError("Liger kernels need CUDA (Triton)", field="liger_kernels")
    if config.offload_layers and device != "cuda":
        raise ConfigError("offloading moves checkpointed inputs from the GPU to host memory; it needs CUDA",
                          field="offload_layers")


def register_varlen_attention() -> str:
    """Register ``persona_varlen`` with transformers (idempotent) and return the name to select it by."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    # The SDPA mask keeps the fallback path exact for padded or unannotated batches; packed training batches
    # ignore it (building it once per forward pass costs far less than one masked attention per layer).
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
    return VARLEN_ATTENTION


def varlen_attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                             dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention interface: (B, H, S, D) inputs, (B, S, H, D) output."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    kernel = packed_kernel_for(query)
    if cu_seqlens is None or max_len is None or query.shape[0] != 1 or dropout:
        kernel = None  # not a packed row: transformers' mask keeps examples apart
    elif kernel is None and not query.is_cuda and _fits_window(int(max_len), sliding_window):
        return per_example_sdpa(query, key, value, cu_seqlens, scaling), None
    if kernel is None or max_len is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    q = query[0].transpose(0, 1)  # (S, H, D), a view
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if kv_heads != heads:  # grouped-query attention: each key/value head serves heads // kv_heads query heads
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    scale = float(scaling) if scaling is not None else dim ** -0.5
    left = -1 if sliding_window is None else int(sliding_window) - 1
    out = kernel(q, k, v, cu_seqlens, int(max_len), scale, left)
    return out.unsqueeze(0), None


def per_example_sdpa(query: Any, key: Any, value: Any, cu_seqlens: Any, scaling: float | None) -> Any:
    """Causal SDPA over each packed example on its own: (1, H, S, D) inputs, (1, S, H, D) output.

    Grouped-query heads are served by SDPA's ``enable_gqa`` rather than copies of the key/value heads.
    """
    import torch

    bounds = [int(b) for b in cu_seqlens.tolist()]  # a host tensor on CPU: no device sync
    if bounds[-1] < query.shape[2]:  # padding after the last example attends to itself; its labels are ignored
        bounds.append(query.shape[2])
    gqa = key.shape[1] != query.shape[1]
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], is_causal=True, scale=scaling,
        enable_gqa=gqa) for start, end in itertools.pairwise(bounds) if end > start]
    return torch.cat(parts, dim=2).transpose(1, 2)


def _fits_window(max_len: int, sliding_window: int | None) -> bool:
    # Per-example calls are plain causal: an example longer than a sliding window needs the masked path.
    return sliding_window is None or max_len <= int(sliding_window)


def packed_kernel_for(query: Any) -> PackedKernel | None:
    """The packed causal kernel for this tensor's device and dtype, or None (then SDPA is used)."""
    import torch

    if not query.is_cuda or query.dtype not in (torch.bfloat16, torch.float16):
        return None
    return _torch_varlen()


_VARLEN_KERNEL: list[PackedKernel | None] = []  # filled once; read (not rebuilt) inside compiled layers


def _torch_varlen() -> PackedKernel | None:
    if not _VARLEN_KERNEL:
        _VARLEN_KERNEL.append(_build_torch_varlen())
    return _VARLEN_KERNEL[0]


def _build_torch_varlen() -> PackedKernel | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    # Read the signature once, here: inspect is not something torch.compile can trace inside a layer.
    params = inspect.signature(varlen_attn).parameters
    has_window, has_scale = "window_size" in params, "scale" in params

    def kernel(q: Any, k: Any, v: Any, cu_seqlens: Any, max_len: int, scale: float, left: int) -> Any:
        kwargs: dict[str, Any] = {}
        if has_window:  # torch >= 2.11
            kwargs["window_size"] = (left, 0)
        else:  # torch 2.10: causal flag, no window
            if left >= 0 and max_len > left + 1:
                raise ConfigError("this torch's varlen attention has no sliding window; use 'sdpa'", field="attention")
            kwargs["is_causal"] = True
        if has_scale:
            kwargs["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
            raise ConfigError("this torch's varlen attention takes no scale; use 'sdpa'", field="attention")
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)

    return kernel


def apply_liger(model: Any) -> str:
    """Liger's fused RMSNorm + SwiGLU on this instance; the architecture's module globals are left unchanged."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        raise ConfigError("liger_kernels=on needs liger-kernel: pip install 'liger-kernel>=0.8'",
                          field="liger_kernels") from exc
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"Liger has no kernels for model type {model_type!r}; set liger_kernels=off",
                          field="liger_kernels")
    modeling = sys.modules[type(model).__module__]
    saved = dict(vars(modeling))
    # transformers' Trainer applies Liger through this same entry point (use_liger_kernel).
    _apply_liger_kernel_to_instance(model=model, rope=False, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    restored = sorted(name for name, value in vars(modeling).items() if saved.get(name, value) is not value)
    for name in restored:
        setattr(modeling, name, saved[name])
    return "rms_norm, swiglu (this model only)"
