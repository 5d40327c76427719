"""Read a Hugging Face causal LM's weights into the engine's own fused layout.

Every decoder layer has four linear groups, named as in Phi-3: ``qkv`` (query, key, value in one product),
``o``, ``gate_up`` and ``down``. Phi-3 stores them fused already; Llama stores q/k/v and gate/up apart,
and dense parts are concatenated here once so the forward pass runs one product per group either way.
The weight tensors are the model's own (no copy) wherever the layout allows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from persona_router.core.errors import ConfigError

log = logging.getLogger(__name__)

GROUPS: tuple[str, ...] = ("qkv", "o", "gate_up", "down")
# Module paths inside one decoder layer, per group, per supported architecture.
LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "phi3": {
        "qkv": ("self_attn.qkv_proj",),
        "o": ("self_attn.o_proj",),
        "gate_up": ("mlp.gate_up_proj",),
        "down": ("mlp.down_proj",),
    },
    "llama": {
        "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "o": ("self_attn.o_proj",),
        "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
        "down": ("mlp.down_proj",),
    },
}


@dataclass
class LinearGroup:
    """One fused linear map ``x -> x W^T (+ b)``; ``parts`` lists (module path, out_features) in order."""

    parts: list[tuple[str, int]]
    in_features: int
    weight: Any = None  # dense [out, in] in the compute dtype
    bias: Any = None
    modules: list[Any] = field(default_factory=list)  # bitsandbytes Linear4bit modules (kernel mode)
    nf4: Any = None  # nf4_kernels.Nf4Weight (fused mode): the modules' 4-bit tensors, read by the Triton kernel
    gemv: Any = None  # Gemv4bit: bitsandbytes' one-row 4-bit product on the module's own weight (dequantize mode)
    kmajor: Any = None  # nf4_gemv.KMajor (fused mode, 16-bit on CUDA): one 4-bit copy for every row count

    @property
    def out_features(self) -> int:
        return sum(n for _, n in self.parts)

    def __call__(self, x: Any, workspace: Any = None) -> Any:
        """``x W^T (+ b)``; ``workspace`` (``nf4_kernels.Workspace``): the 4-bit kernels' scratch, the caller's own
        (the engine passes its runner's, so two engines never share one; None: one per process)."""
        import torch
        import torch.nn.functional as F

        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        if self.kmajor is not None:
            from persona_router.adapters.engine.nf4_mma import matmul

            out = matmul(x, self.kmajor, workspace=workspace)
            return out if self.bias is None else out + self.bias
        if self.nf4 is not None:
            from persona_router.adapters.engine.nf4_kernels import nf4_matmul

            out = nf4_matmul(x, self.nf4, workspace=workspace)
            return out if self.bias is None else out + self.bias
        outs = [module(x) for module in self.modules]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


@dataclass
class LayerWeights:
    input_norm: Any
    post_attention_norm: Any
    groups: dict[str, LinearGroup]


@dataclass
class ModelWeights:
    """Everything the forward pass reads, plus the shape facts it needs."""

    arch: str
    embed: Any
    layers: list[LayerWeights]
    final_norm: Any
    lm_head: Any
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    rms_eps: float
    sliding_window: int | None
    activation: Callable[[Any], Any]
    dtype: Any
    device: Any
    rotary: Any  # the model's own rotary embedding module: its cos/sin are reused bit for bit
    rope_type: str
    original_max_position: int | None


def architecture(config: Any) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        raise ConfigError(
            f"the engine runs Phi-3 and Llama layouts; this model is {model_type!r}", field="base"
        )
    return str(model_type)


def extract_weights(model: Any, *, nf4_mode: str, gemv: bool = False, gemv_kernel: str = "bitsandbytes"
                    ) -> ModelWeights:
    """Collect the weights of a loaded ``*ForCausalLM`` (dense or bitsandbytes 4-bit).

    ``gemv``: in ``dequantize`` mode, also keep each single-module 4-bit group readable by a one-row kernel
    (``Gemv4bit``; ``gemv_kernel`` says whose), for batch-1 decoding from the 4-bit bytes beside the dense copy
    for wider batches."""
    from transformers.activations import ACT2FN

    config = model.config
    arch = architecture(config)
    inner = model.model
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    embed = inner.embed_tokens.weight.detach()
    layers = [_layer(layer, LAYOUTS[arch], nf4_mode=nf4_mode, dtype=embed.dtype, gemv=gemv_kernel if gemv else None)
              for layer in inner.layers]
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return ModelWeights(
        arch=arch,
        embed=embed,
        layers=layers,
        final_norm=inner.norm.weight.detach(),
        lm_head=model.lm_head.weight.detach(),
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        vocab_size=model.lm_head.weight.shape[0],
        rms_eps=float(config.rms_norm_eps),
        sliding_window=getattr(config, "sliding_window", None),
        activation=ACT2FN[config.hidden_act],
        dtype=embed.dtype,
        device=embed.device,
        rotary=inner.rotary_emb,
        rope_type=str(rope.get("rope_type", "default")),
        original_max_position=getattr(config, "original_max_position_embeddings", None),
    )


def _layer(layer: Any, layout: dict[str, tuple[str, ...]], *, nf4_mode: str, dtype: Any, gemv: str | None
           ) -> LayerWeights:
    groups = {name: _group(layer, paths, nf4_mode=nf4_mode, dtype=dtype, gemv=gemv) for name, paths in layout.items()}
    return LayerWeights(
        input_norm=layer.input_layernorm.weight.detach(),
        post_attention_norm=layer.post_attention_layernorm.weight.detach(),
        groups=groups,
    )


def _group(layer: Any, paths: tuple[str, ...], *, nf4_mode: str, dtype: Any, gemv: str | None = None) -> LinearGroup:
    import torch

    # A PEFT-wrapped model shares its base weights; the engine must see the bare layers, never the LoRA wrapper.
    modules = [_bare(layer.get_submodule(path)) for path in paths]
    parts = [(path, int(module.out_features)) for path, module in zip(paths, modules, strict=True)]
    group = LinearGroup(parts=parts, in_features=int(modules[0].in_features))
    quantized = [_is_4bit(module) for module in modules]
    if any(quantized) and not all(quantized):
        raise ConfigError("a layer mixes 4-bit and dense weights in one group", field="base")
    if all(quantized) and nf4_mode == "kernel":
        group.modules = modules
        return group
    if all(quantized) and nf4_mode == "fused":
        from persona_router.adapters.engine.nf4_kernels import nf4_weight

        group.kmajor = _kmajor_group(modules, dtype, kernel=_one_row_kernel(gemv))
        group.nf4 = None if group.kmajor is not None else nf4_weight(modules)
        if group.kmajor is not None or group.nf4 is not None:
            biases = [module.bias for module in modules]
            if any(b is not None for b in biases):
                if not all(b is not None for b in biases):
                    raise ConfigError("a fused group has a bias on some parts only", field="base")
                group.bias = torch.cat([b.detach() for b in biases]).to(dtype)
            return group
        log.warning("%s: 4-bit layout the fused kernel does not read (block size or shape); dequantizing it",
                    ", ".join(paths))
    if all(quantized) and gemv is not None and len(modules) == 1 and modules[0].weight.data.is_cuda:
        group.gemv = Gemv4bit.of(modules[0], kernel=gemv, dtype=dtype)
    weights = [_dense_weight(module, dtype) for module in modules]
    biases = [module.bias for module in modules]
    group.weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)
    if any(b is not None for b in biases):
        if not all(b is not None for b in biases):
            raise ConfigError("a fused group has a bias on some parts only", field="base")
        group.bias = biases[0] if len(biases) == 1 else torch.cat(biases, dim=0)
        group.bias = group.bias.to(group.weight.dtype)
    return group


@dataclass
class Gemv4bit:
    """A 4-bit weight as bitsandbytes' CUDA GEMV reads it, its double-quantised absmax decoded once (float32)
    so a call is one kernel (``bitsandbytes.functional.gemv_4bit`` decodes it on every call)."""

    packed: Any
    shape: tuple[int, int]
    absmax: Any
    code: Any
    blocksize: int
    # (nf4_kernels.Nf4Weight over the same bytes and decoded absmax, nf4_lut PTX): the engine's register-lookup
    # GEMV instead of bitsandbytes' (``gemv="triton"``); None where its shape rules it out
    lut: tuple[Any, str] | None = None
    # nf4_gemv.KMajor: the engine's K-major copy for its own GEMV (``gemv="kmajor"``); None where K rules it out
    kmajor: Any = None

    @classmethod
    def of(cls, module: Any, kernel: str = "bitsandbytes", dtype: Any = None) -> Gemv4bit:
        state = module.weight.quant_state
        gemv = cls(packed=module.weight.data, shape=(int(state.shape[0]), int(state.shape[1])),
                   absmax=_decoded_absmax(state), code=state.code, blocksize=int(state.blocksize))
        if kernel in ("kmajor", "cuda"):
            from persona_router.adapters.engine.nf4_gemv import kmajor

            n, k = gemv.shape
            if gemv.blocksize == 64 and _kmajor_runs(dtype, gemv.packed.device):
                gemv.kmajor = kmajor(gemv.packed, gemv.absmax, gemv.code, n, k, dtype, kernel=_one_row_kernel(kernel))
            if gemv.kmajor is None:
                log.warning("4-bit weight %s x %s (block %d, %s): no K-major GEMV for it; using bitsandbytes' GEMV",
                            n, k, gemv.blocksize, dtype)
            else:  # its scales are in the copy: keep one float32 absmax, not two
                gemv.absmax = None
        elif kernel == "triton":
            gemv.lut = gemv.lut_view()
            if gemv.lut is None:
                log.warning("4-bit weight %s x %s (block %d): no register-lookup GEMV for this shape; using "
                            "bitsandbytes' GEMV", *gemv.shape, gemv.blocksize)
        return gemv

    def lut_view(self) -> tuple[Any, str] | None:
        import torch
        from persona_router.adapters.engine.nf4_kernels import QBLOCK, Nf4Weight, lut_tiles
        from persona_router.adapters.engine.nf4_lut import ptx

        n, k = self.shape
        if self.blocksize != QBLOCK or lut_tiles(n, k) is None or self.packed.numel() * 2 != n * k:
            return None
        one = torch.ones(1, device=self.absmax.device)
        weight = Nf4Weight(packed=self.packed.reshape(n, k // 2), absmax_q=self.absmax, absmax2=one,
                           offset2=one * 0, code2=one * 0, code=self.code.float(), n=n, k=k, block2=1 << 30,
                           double=False)
        return weight, ptx(self.code.float().tolist())

    def __call__(self, x: Any) -> Any:
        """``x W^T`` for one row ``x`` ([1, K], the compute dtype)."""
        import torch

        if self.kmajor is not None:
            from persona_router.adapters.engine.nf4_gemv import gemv

            return gemv(x, self.kmajor)
        return torch.ops.bitsandbytes.gemv_4bit.default(x, self.packed, list(self.shape), self.absmax, self.code,
                                                       self.blocksize)


def _bare(module: Any) -> Any:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _is_4bit(module: Any) -> bool:
    return hasattr(module.weight, "quant_state") and module.weight.quant_state is not None


def _dense_weight(module: Any, dtype: Any) -> Any:
    """The module's weight as a dense [out, in] tensor in the activations' dtype; 4-bit weights are unpacked."""
    if not _is_4bit(module):
        return module.weight.detach()
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        raise ConfigError(
            "this 4-bit model was already run on CPU and repacked; build the engine before the first forward "
            "pass, or use nf4_mode='kernel'",
            field="nf4_mode",
        )
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:  # pragma: no cover - a 4-bit model cannot load without it
        raise ConfigError("4-bit weights need bitsandbytes: pip install bitsandbytes==0.50.2") from exc
    return bnbf.dequantize_4bit(module.weight.data, state).to(dtype)


def _one_row_kernel(gemv: str | None) -> str:
    """Which kernel reads a K-major copy at one row: the CUDA C++ one for ``gemv="cuda"`` (ConfigError, naming
    what to install, where NVRTC is missing), else the Triton one."""
    if gemv != "cuda":
        return "triton"
    from persona_router.adapters.engine.cuda_rtc import nvrtc

    nvrtc()
    return "cuda"


def _kmajor_group(modules: list[Any], dtype: Any, kernel: str = "triton") -> Any:
    """One K-major copy of the modules' 4-bit weights stacked along N (``nf4_gemv.KMajor``), read by the one-row
    GEMV (``kernel``) and the many-row product alike; None where they cannot read it (block size, K, dtype, GPU),
    and the fused mode then keeps the row-major kernels (``nf4_kernels``)."""
    import torch
    from persona_router.adapters.engine.nf4_gemv import kmajor

    states = [module.weight.quant_state for module in modules]
    k = int(states[0].shape[1])
    if (any(s.blocksize != 64 or int(s.shape[1]) != k or s.quant_type != states[0].quant_type for s in states)
            or k % 128
            or not _kmajor_runs(dtype, modules[0].weight.data.device)):
        return None
    if any(getattr(s, "packing_format_for_cpu", False) for s in states):
        return None
    n = sum(int(s.shape[0]) for s in states)
    absmax = torch.cat([_decoded_absmax(s) for s in states])
    packed = torch.cat([module.weight.data.reshape(-1) for module in modules])
    return kmajor(packed, absmax, states[0].code, n, k, dtype, kernel=kernel)


def _decoded_absmax(state: Any) -> Any:
    """A 4-bit weight's per-block scales as contiguous float32, decoded from double quantisation where nested
    (bitsandbytes' GEMV would decode them on every call)."""
    import bitsandbytes.functional as bnbf

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.float().contiguous()


def _kmajor_runs(dtype: Any, device: Any) -> bool:
    """The K-major GEMV multiplies 16-bit pairs (``fma.rn.bf16x2`` / ``f16x2``: compute capability 8.0 and up);
    float32 models and older GPUs keep bitsandbytes' GEMV."""
    import torch

    if dtype not in (torch.bfloat16, torch.float16):
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)
