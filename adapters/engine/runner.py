"""The engine's own decoder forward pass over a static KV cache, with batched multi-adapter LoRA.

The cache holds ``max_batch`` rows of positions per layer (``[rows, kv_heads, cache_len, head_dim]``). A
request owns one cache row from prefill to finish. Prefill runs a batch of new prompts (right-padded,
causal attention inside each prompt) and writes their keys and values at positions ``0..len-1``; decode
runs one token for each of the first ``n`` rows at that row's own position and attends over the first
``kv_len`` positions with a per-row mask. Rows without a request compute garbage that lands only in their
own, unused cache row. Hidden states stay 2-D (``[tokens, hidden]``) outside attention.

Two numerics modes. Exact (CPU default): every operation mirrors Hugging Face's Phi-3/Llama modules and
PEFT's LoRA, so float32 outputs match the reference token for token. Fused (CUDA default): the pointwise
pieces are compiled into single kernels, the residual add rides in the projection's ``addmm`` and the LoRA
update in a second ``addmm`` with the adapter scaling folded into the row mask: fewer kernels per layer,
the same function up to rounding order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from persona_router.adapters.engine.config import EngineConfig
from persona_router.adapters.engine.kernels import Shapes, pointwise
from persona_router.adapters.engine.lora_bank import LoraBank
from persona_router.adapters.engine.lora_kernels import Prologue
from persona_router.adapters.engine.weights import ModelWeights
from persona_router.core.errors import ConfigError

log = logging.getLogger(__name__)
_DYNAMIC_ROPE = ("dynamic", "longrope")


@dataclass
class PrefillInputs:
    tokens: Any  # [batch, length] int64, right-padded with token 0
    row_index: Any  # [batch] cache rows
    slot_ids: Any  # [batch * length] LoRA slot per token
    last: Any  # [batch] index of each prompt's last token


class ModelRunner:
    """Owns the KV cache and the step inputs; ``prefill`` and ``decode`` return float32 logits."""

    def __init__(self, weights: ModelWeights, bank: LoraBank, config: EngineConfig, *, fused: bool = False,
                 compiled: bool = False, kernels: bool = False, dense_gemv: bool = False) -> None:
        import torch

        self.w = weights
        self.bank = bank
        self.config = config
        self.fused = fused
        self.kernels = kernels  # Triton LoRA (gather by slot) and decode attention (live lengths); see config
        self.dense_gemv = dense_gemv  # one-row dense products on the CUDA C++ GEMV (config.dense_gemv, resolved)
        from persona_router.adapters.engine.nf4_kernels import Workspace

        self.workspace = Workspace()  # split-K scratch of the fused 4-bit kernels, this runner's own
        largest = max((g.kmajor.n * g.kmajor.k for layer in weights.layers for g in layer.groups.values()
                       if g.kmajor is not None), default=0)
        if largest:  # the wide 4-bit products' dense scratch at full size now: never re-allocated inside a capture
            self.workspace.scratch(weights.device, largest, weights.dtype)
        # The kernel path computes the gated activation inside the down projection's LoRA shrink (SiLU only).
        self.silu = type(weights.activation).__name__ in ("SiLU", "SiLUActivation")
        self.device = weights.device
        self.dtype = weights.dtype
        self.max_batch = config.max_batch
        self.max_len = config.max_len
        # Attention kernels want the mask's last dimension 16-aligned; the spare positions are never attended.
        self.cache_len = -(-config.max_len // 16) * 16
        shape = (config.max_batch, weights.num_kv_heads, self.cache_len, weights.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in weights.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in weights.layers]
        self.cos, self.sin = self._rope_tables()
        # Static step inputs, one row per cache row: (token, position, LoRA slot). Graph replays read them by
        # address; the scheduler fills them with one host-to-device copy per step.
        self.step_inputs = torch.zeros(config.max_batch, 3, dtype=torch.long, device=self.device)
        self.tokens = self.step_inputs[:, 0]
        self.positions = self.step_inputs[:, 1]
        self.slot_ids = self.step_inputs[:, 2]
        self.rows = torch.arange(config.max_batch, device=self.device)
        # Written by every decode step (inside its CUDA graph): each row's argmax and whether its logits are all
        # finite, so the scheduler reads both with one device-to-host copy.
        self.summary = torch.zeros(2, config.max_batch, dtype=torch.long, device=self.device)
        self.kv_arange = torch.arange(self.cache_len, device=self.device)
        shapes = Shapes(hidden=weights.hidden_size, intermediate=weights.layers[0].groups["down"].in_features,
                        heads=weights.num_heads, kv_heads=weights.num_kv_heads, head_dim=weights.head_dim,
                        rotary=int(self.cos.shape[-1]))
        self.pw = pointwise(weights.activation, compile_on=(self.device, self.dtype) if compiled else None,
                            shapes=shapes)

    def kv_len_for(self, max_position: int) -> int:
        """How many cache positions a decode step attends, rounded up to ``kv_block`` (few graph shapes)."""
        block = self.config.kv_block
        return min(self.cache_len, (max_position // block + 1) * block)

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def _rope_tables(self) -> tuple[Any, Any]:
        """cos/sin for every position, from the model's own rotary module (identical values, any rope type)."""
        import torch

        original = self.w.original_max_position
        if self.w.rope_type in _DYNAMIC_ROPE and original is not None and self.max_len > original:
            raise ConfigError(f"rope type {self.w.rope_type!r} changes with sequence length; keep max_len <= "
                              f"{original}", field="max_len")
        positions = torch.arange(self.cache_len, device=self.device).unsqueeze(0)
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            cos, sin = self.w.rotary(probe, position_ids=positions)
        return cos[0].contiguous(), sin[0].contiguous()  # [cache_len, rotary_dim], as the decode kernel reads them

    # -- public steps -------------------------------------------------------------------------------

    def prefill(self, rows: list[int], prompts: list[list[int]], slots: list[int], m: int) -> Any:
        """Run whole prompts into cache ``rows``; returns [len(rows), vocab] logits of each last token."""
        return self.prefill_forward(self.prefill_inputs(rows, prompts, slots, max(len(p) for p in prompts)), m)

    def prefill_inputs(self, rows: list[int], prompts: list[list[int]], slots: list[int], length: int
                       ) -> PrefillInputs:
        """Device tensors for a prefill of prompts right-padded to ``length`` (at least the longest prompt).

        Padding positions compute values from token 0 that land in the row's cache past its prompt; decode
        never attends a position before writing it, and causal attention keeps them out of the prompt's own."""
        import torch

        tokens = torch.zeros(len(rows), length, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            tokens[i, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        return PrefillInputs(
            tokens=tokens.to(self.device),
            row_index=torch.tensor(rows, dtype=torch.long, device=self.device),
            slot_ids=torch.tensor(slots, dtype=torch.long, device=self.device).repeat_interleave(length),
            last=torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long, device=self.device))

    def prefill_forward(self, inputs: PrefillInputs, m: int) -> Any:
        """The prefill on device tensors only (no host work: a CUDA graph can capture it)."""
        import torch

        batch, length = inputs.tokens.shape
        with torch.inference_mode():
            self._reset_rows(inputs.row_index)
            lora = self._lora_batch(inputs.slot_ids, m)
            x = self.w.embed[inputs.tokens.view(-1)]
            cos = self.cos[:length].repeat(batch, 1).unsqueeze(1)  # per token: [batch * length, 1, rotary]
            sin = self.sin[:length].repeat(batch, 1).unsqueeze(1)
            for index in range(len(self.w.layers)):
                x = self._layer(index, x, batch, length, lora, cos, sin, lambda q, k, v, i=index:
                                self._prefill_attention(i, q, k, v, inputs.row_index))
            hidden = x.view(batch, length, -1)[torch.arange(batch, device=self.device), inputs.last]
            return self._logits(hidden)

    def _reset_rows(self, row_index: Any) -> None:
        """Zero whole cache rows before a new request owns them. Decode attends over ``kv_len`` positions and
        masks the ones past the row's own with -inf, but ``nan + -inf`` is NaN: a value left behind by an
        earlier request (one that went non-finite, say) would otherwise reach the new one."""
        for cache in (*self.k_cache, *self.v_cache):
            cache.index_fill_(0, row_index, 0)

    def decode(self, n: int, kv_len: int, m: int) -> Any:
        """One token for each of the first ``n`` rows, from the static ``tokens/positions/slot_ids``."""
        import torch

        with torch.inference_mode():
            return self._decode(n, kv_len, m)

    def _decode(self, n: int, kv_len: int, m: int) -> Any:
        import torch

        positions = self.positions[:n]
        x = self.w.embed[self.tokens[:n]]  # [n, hidden]
        if self.kernels:  # per-row slots and positions go to the kernels as they are: no masks to build
            lora = self._lora_batch(self.slot_ids[:n].contiguous(), m)
            live = positions.contiguous()
            for index in range(len(self.w.layers)):  # the attention kernel rotates: no cos/sin gather here
                x = self._layer(index, x, n, 1, lora, None, None, lambda q, k, v, i=index:
                                self._decode_attention_kernel(i, q, k, v, live, kv_len), rotate=False)
            return self._summarized(self._logits(x))
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [n, 1, rotary]
        lora = self.bank.batch(self.slot_ids[:n], m, fused=self.fused)
        keys = self.kv_arange[:kv_len].unsqueeze(0)
        visible = keys <= positions.unsqueeze(1)
        if self.w.sliding_window is not None:
            visible = visible & (keys > positions.unsqueeze(1) - self.w.sliding_window)
        # Additive mask built once per step, not once per layer.
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, float("-inf"))
        mask = mask[:, None, None, :]  # [n, 1, 1, kv_len]
        for index in range(len(self.w.layers)):
            x = self._layer(index, x, n, 1, lora, cos, sin, lambda q, k, v, i=index:
                            self._decode_attention(i, q, k, v, n, kv_len, mask))
        return self._summarized(self._logits(x))

    def _summarized(self, logits: Any) -> Any:
        """Fill ``summary`` for these rows (argmax, all-finite) and pass the logits on."""
        import torch

        n = logits.shape[0]
        self.summary[0, :n] = logits.argmax(dim=-1)
        self.summary[1, :n] = torch.isfinite(logits).all(dim=-1)
        return logits

    # -- pieces ------------------------------------------------------------------------------------

    def _layer(self, index: int, x: Any, batch: int, seq: int, lora: Any, cos: Any, sin: Any, attend: Any,
               rotate: bool = True) -> Any:
        """One decoder layer; ``rotate=False`` when ``attend`` applies the rotary embedding itself."""
        layer = self.w.layers[index]
        heads, kv_heads, dim = self.w.num_heads, self.w.num_kv_heads, self.w.head_dim
        qkv = self._norm_linear(index, "qkv", x, layer.input_norm, lora)
        q_end, k_end = heads * dim, (heads + kv_heads) * dim
        tokens = batch * seq
        q = qkv[:, :q_end].view(tokens, heads, dim)
        k = qkv[:, q_end:k_end].view(tokens, kv_heads, dim)
        if rotate:  # on [tokens, heads, dim] with per-token cos/sin: one shape family for prefill and decode
            q, k = self.pw.rotate(q, cos, sin), self.pw.rotate(k, cos, sin)
        v = qkv[:, k_end:].view(tokens, kv_heads, dim)
        q, k, v = (t.view(batch, seq, -1, dim).transpose(1, 2) for t in (q, k, v))
        attn = attend(q, k, v).transpose(1, 2).reshape(tokens, heads * dim)
        x = self._linear(index, "o", attn, lora, residual=x)
        gate_up = self._norm_linear(index, "gate_up", x, layer.post_attention_norm, lora)
        if self.silu and self._triton_lora(lora, tokens):  # the down projection's shrink computes the activation
            return self._linear_kernels(index, "down", gate_up, lora, x, Prologue("silu_mul"))
        return self._linear(index, "down", self.pw.act_mul(gate_up), lora, residual=x)

    def _triton_lora(self, lora: Any, rows: int) -> bool:
        """Whether this step's LoRA runs as Triton kernels (up to ``config.lora_kernel_rows`` rows; few rows
        gather their adapter by slot); wider steps use the bank's two products over the resident slots."""
        return self.kernels and lora.m > 0 and rows <= self.config.lora_kernel_rows

    def _norm_linear(self, index: int, group: str, x: Any, weight: Any, lora: Any) -> Any:
        """``RMSNorm(x)`` then its projection; when the LoRA shrink is a Triton kernel it computes the norm too."""
        if self._triton_lora(lora, x.shape[0]):
            return self._linear_kernels(index, group, x, lora, None, Prologue("norm", weight, self.w.rms_eps))
        return self._linear(index, group, self.pw.norm(x, weight, self.w.rms_eps), lora)

    def _lora_batch(self, slot_ids: Any, m: int) -> Any:
        from persona_router.adapters.engine.lora_bank import LoraBatch

        # Triton kernels gather each row's adapter by slot id: the bank's one-hot masks are not needed.
        if self.kernels and slot_ids.shape[0] <= self.config.lora_kernel_rows:
            return LoraBatch(slot_ids=slot_ids, m=m, fused=True)
        return self.bank.batch(slot_ids, m, fused=self.fused)

    def _linear(self, index: int, group: str, x: Any, lora: Any, residual: Any = None) -> Any:
        """``[residual +] x W^T + LoRA(x)`` for 2-D ``x``."""
        import torch

        if self.kernels:
            return self._linear_kernels(index, group, x, lora, residual)
        linear = self.w.layers[index].groups[group]
        if self.fused and residual is not None and linear.weight is not None and linear.bias is None:
            return self.bank.apply(index, group, x, torch.addmm(residual, x, linear.weight.t()), lora)
        out = self.bank.apply(index, group, x, linear(x, self.workspace), lora)
        return out if residual is None else residual + out

    def _linear_kernels(self, index: int, group: str, x: Any, lora: Any, residual: Any,
                        prologue: Prologue | None = None) -> Any:
        """The kernel path. LoRA: up to ``config.lora_kernel_rows`` rows a Triton shrink by slot (computing the
        product's input from ``x`` first when given a ``prologue``, which needs ``_triton_lora``) and an expand
        that also adds the residual; wider steps the bank's products. Base: the fused 4-bit kernel
        (``nf4_mode="fused"``, LoRA and residual in its epilogue; one K-major copy for every row count where it
        runs: ``nf4_gemv`` for one row, ``nf4_mma`` for more), for one row a 4-bit GEMV (``gemv="kmajor"`` or
        ``"triton"``: the engine's own, LoRA and residual in its epilogue; else bitsandbytes'), else cuBLAS on
        the dense weight."""
        import torch
        from persona_router.adapters.engine.lora_kernels import expand_, shrink

        linear = self.w.layers[index].groups[group]
        rows = x.shape[0]
        shrunk = None
        if self._triton_lora(lora, rows):
            shrunk = shrink(x, self.bank.a[index][group], self.bank.bt[index][group], lora.slot_ids,
                            self.bank.scaling, m=lora.m, prologue=prologue)
            x = shrunk.h
        kmajor = linear.kmajor
        if kmajor is None and linear.gemv is not None and rows == 1:
            kmajor = linear.gemv.kmajor
        if kmajor is not None and linear.bias is None:
            from persona_router.adapters.engine.nf4_mma import matmul

            out = matmul(x, kmajor, residual=residual, lora=shrunk, workspace=self.workspace)
            return out if shrunk is not None else self.bank.apply(index, group, x, out, lora)
        lut = linear.gemv.lut if linear.gemv is not None and rows == 1 else None
        if (linear.nf4 is not None or lut is not None) and linear.bias is None:
            from persona_router.adapters.engine.nf4_kernels import nf4_matmul

            weight, asm = (lut[0], lut[1]) if lut is not None else (linear.nf4, "")
            out = nf4_matmul(x, weight, residual=residual, lora=shrunk, workspace=self.workspace, lut=asm)
            return out if shrunk is not None else self.bank.apply(index, group, x, out, lora)
        if self._dense_gemv(linear, rows):
            from persona_router.adapters.engine.dense_gemv_cuda import dense_gemv

            out = dense_gemv(x, linear.weight, residual=residual, lora=shrunk)
            return out if shrunk is not None else self.bank.apply(index, group, x, out, lora)
        if linear.gemv is not None and rows == 1 and linear.bias is None:
            out = linear.gemv(x.contiguous())
        elif residual is not None and linear.weight is not None and linear.bias is None:
            out, residual = torch.addmm(residual, x, linear.weight.t()), None
        else:
            out = linear(x, self.workspace)
        if shrunk is not None:
            return expand_(out, shrunk, residual)
        out = out if residual is None else out + residual
        return self.bank.apply(index, group, x, out, lora)

    def _dense_gemv(self, linear: Any, rows: int) -> bool:
        """One row on a dense 16-bit weight with ``dense_gemv``: the CUDA C++ GEMV (``dense_gemv_cuda``), LoRA
        and residual in its epilogue, instead of cuBLAS and the expand kernel."""
        if rows != 1 or not self.dense_gemv or linear.weight is None or linear.bias is not None:
            return False
        from persona_router.adapters.engine.dense_gemv_cuda import runs

        return bool(runs(linear.weight))

    def _decode_attention_kernel(self, index: int, q: Any, k: Any, v: Any, positions: Any, kv_len: int) -> Any:
        from persona_router.adapters.engine.attention_kernels import decode_attention

        out = decode_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.k_cache[index], self.v_cache[index],
                               positions, kv_len, self.w.sliding_window, rotary=(self.cos, self.sin),
                               workspace=self.workspace)
        return out.unsqueeze(2)  # [n, heads, 1, dim], as SDPA returns it

    def _logits(self, hidden: Any) -> Any:
        import torch
        import torch.nn.functional as F

        return F.linear(self.pw.norm(hidden, self.w.final_norm, self.w.rms_eps), self.w.lm_head).to(torch.float32)

    def _prefill_attention(self, index: int, q: Any, k: Any, v: Any, row_index: Any) -> Any:
        import torch
        import torch.nn.functional as F

        seq = q.shape[2]
        self.k_cache[index][row_index, :, :seq] = k
        self.v_cache[index][row_index, :, :seq] = v
        gqa = self.w.num_heads != self.w.num_kv_heads
        window = self.w.sliding_window
        if self.kernels and q.is_cuda and (window is None or seq <= window):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            # Flash attention first (causal, no mask tensor); the others only where flash refuses the shapes.
            order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                     SDPBackend.MATH]
            with sdpa_kernel(order, set_priority=True):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if window is None or seq <= window:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        pos = torch.arange(seq, device=q.device)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def _decode_attention(self, index: int, q: Any, k: Any, v: Any, n: int, kv_len: int, mask: Any) -> Any:
        import torch.nn.functional as F

        positions = self.positions[:n]
        rows = self.rows[:n]
        self.k_cache[index][rows, :, positions] = k[:, :, 0]
        self.v_cache[index][rows, :, positions] = v[:, :, 0]
        keys = self.k_cache[index][:n, :, :kv_len]
        values = self.v_cache[index][:n, :, :kv_len]
        heads, kv_heads, dim = self.w.num_heads, self.w.num_kv_heads, self.w.head_dim
        if heads == kv_heads:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        # One query token: fold each kv head's query group into the query-length axis (no repeated K/V).
        packed = q.reshape(n, kv_heads, heads // kv_heads, dim)
        out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask)
        return out.reshape(n, heads, 1, dim)
