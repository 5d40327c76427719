"""The engine's own decoder forward pass over a static KV cache, with batched multi-adapter LoRA.

The cache holds ``max_batch`` rows of ``max_len`` positions per layer (``[rows, kv_heads, max_len,
head_dim]``). A request owns one cache row from prefill to finish. Prefill runs a batch of new prompts
(right-padded, causal attention inside each prompt) and writes their keys and values at positions
``0..len-1``; decode runs one token for each of the first ``n`` rows at that row's own position and
attends over the first ``kv_len`` positions with a per-row mask. Rows without a request compute garbage
that lands only in their own, unused cache row.

The arithmetic mirrors Hugging Face's Phi-3/Llama modules operation by operation (RMSNorm in float32,
the model's own rotary tables, SDPA attention) so float32 outputs match the reference.
"""

from __future__ import annotations

import logging
from typing import Any

from adapters.engine.config import EngineConfig
from adapters.engine.lora_bank import LoraBank
from adapters.engine.weights import ModelWeights
from adapters.errors import ConfigError

log = logging.getLogger(__name__)
_DYNAMIC_ROPE = ("dynamic", "longrope")


class ModelRunner:
    """Owns the KV cache and the step inputs; ``prefill`` and ``decode`` return float32 logits."""

    def __init__(self, weights: ModelWeights, bank: LoraBank, config: EngineConfig) -> None:
        import torch

        self.w = weights
        self.bank = bank
        self.config = config
        self.device = weights.device
        self.dtype = weights.dtype
        self.max_batch = config.max_batch
        self.max_len = config.max_len
        shape = (config.max_batch, weights.num_kv_heads, config.max_len, weights.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in weights.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in weights.layers]
        self.cos, self.sin = self._rope_tables()
        # Static step inputs (graph capture reads them by address).
        self.tokens = torch.zeros(config.max_batch, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(config.max_batch, dtype=torch.long, device=self.device)
        self.slot_ids = torch.zeros(config.max_batch, dtype=torch.long, device=self.device)
        self.rows = torch.arange(config.max_batch, device=self.device)
        self.kv_arange = torch.arange(config.max_len, device=self.device)

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def _rope_tables(self) -> tuple[Any, Any]:
        """cos/sin for every position, from the model's own rotary module (identical values, any rope type)."""
        import torch

        original = self.w.original_max_position
        if self.w.rope_type in _DYNAMIC_ROPE and original is not None and self.max_len > original:
            raise ConfigError(f"rope type {self.w.rope_type!r} changes with sequence length; keep max_len <= "
                              f"{original}", field="max_len")
        positions = torch.arange(self.max_len, device=self.device).unsqueeze(0)
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            cos, sin = self.w.rotary(probe, position_ids=positions)
        return cos[0], sin[0]  # [max_len, rotary_dim]

    # -- public steps -------------------------------------------------------------------------------

    def prefill(self, rows: list[int], prompts: list[list[int]], slots: list[int], m: int) -> Any:
        """Run whole prompts into cache ``rows``; returns [len(rows), vocab] logits of each last token."""
        import torch

        batch, longest = len(rows), max(len(p) for p in prompts)
        tokens = torch.zeros(batch, longest, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            tokens[i, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        tokens = tokens.to(self.device)
        row_index = torch.tensor(rows, dtype=torch.long, device=self.device)
        slot_ids = torch.tensor(slots, dtype=torch.long, device=self.device).repeat_interleave(longest)
        last = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            lora = self.bank.batch(slot_ids, m)
            x = self.w.embed[tokens]
            cos, sin = self.cos[:longest][None, None], self.sin[:longest][None, None]
            for index in range(len(self.w.layers)):
                x = self._layer(index, x, lora, cos, sin, lambda q, k, v, i=index: self._prefill_attention(
                    i, q, k, v, row_index))
            hidden = x[torch.arange(batch, device=self.device), last]
            return self._logits(hidden)

    def decode(self, n: int, kv_len: int, m: int) -> Any:
        """One token for each of the first ``n`` rows, from the static ``tokens/positions/slot_ids``."""
        import torch

        with torch.inference_mode():
            return self._decode(n, kv_len, m)

    def _decode(self, n: int, kv_len: int, m: int) -> Any:
        positions = self.positions[:n]
        lora = self.bank.batch(self.slot_ids[:n], m)
        x = self.w.embed[self.tokens[:n]].unsqueeze(1)  # [n, 1, hidden]
        cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]
        keys = self.kv_arange[:kv_len].unsqueeze(0)
        visible = keys <= positions.unsqueeze(1)
        if self.w.sliding_window is not None:
            visible = visible & (keys > positions.unsqueeze(1) - self.w.sliding_window)
        mask = visible[:, None, None, :]  # [n, 1, 1, kv_len]
        for index in range(len(self.w.layers)):
            x = self._layer(index, x, lora, cos, sin, lambda q, k, v, i=index: self._decode_attention(
                i, q, k, v, n, kv_len, mask))
        return self._logits(x[:, 0])

    # -- pieces ------------------------------------------------------------------------------------

    def _layer(self, index: int, x: Any, lora: Any, cos: Any, sin: Any, attend: Any) -> Any:
        layer = self.w.layers[index]
        batch, seq, _ = x.shape
        heads, kv_heads, dim = self.w.num_heads, self.w.num_kv_heads, self.w.head_dim
        residual = x
        h = self._norm(x, layer.input_norm)
        qkv = self._linear(index, "qkv", h, lora)
        q_end, k_end = heads * dim, (heads + kv_heads) * dim
        q = qkv[..., :q_end].view(batch, seq, heads, dim).transpose(1, 2)
        k = qkv[..., q_end:k_end].view(batch, seq, kv_heads, dim).transpose(1, 2)
        v = qkv[..., k_end:].view(batch, seq, kv_heads, dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        attn = attend(q, k, v).transpose(1, 2).reshape(batch, seq, heads * dim)
        x = residual + self._linear(index, "o", attn, lora)
        residual = x
        h = self._norm(x, layer.post_attention_norm)
        gate, up = self._linear(index, "gate_up", h, lora).chunk(2, dim=-1)
        return residual + self._linear(index, "down", up * self.w.activation(gate), lora)

    def _linear(self, index: int, group: str, x: Any, lora: Any) -> Any:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        out = self.w.layers[index].groups[group](flat)
        out = self.bank.apply(index, group, flat, out, lora)
        return out.view(*shape[:-1], out.shape[-1])

    def _norm(self, x: Any, weight: Any) -> Any:
        import torch

        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.w.rms_eps)
        return weight * h.to(dtype)

    def _logits(self, hidden: Any) -> Any:
        import torch
        import torch.nn.functional as F  # noqa: N812

        return F.linear(self._norm(hidden, self.w.final_norm), self.w.lm_head).to(torch.float32)

    def _prefill_attention(self, index: int, q: Any, k: Any, v: Any, row_index: Any) -> Any:
        import torch
        import torch.nn.functional as F  # noqa: N812

        seq = q.shape[2]
        self.k_cache[index][row_index, :, :seq] = k
        self.v_cache[index][row_index, :, :seq] = v
        groups = self.w.num_heads // self.w.num_kv_heads
        window = self.w.sliding_window
        if window is None or seq <= window:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
        pos = torch.arange(seq, device=q.device)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)

    def _decode_attention(self, index: int, q: Any, k: Any, v: Any, n: int, kv_len: int, mask: Any) -> Any:
        import torch.nn.functional as F  # noqa: N812

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


def _rotate(x: Any, cos: Any, sin: Any) -> Any:
    """Rotary embedding on the first ``cos.shape[-1]`` dims (Phi-3's partial rotary keeps the rest)."""
    import torch

    rotary = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    half = rotary // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    embedded = (x_rot * cos) + (rotated * sin)
    if x_pass.shape[-1] == 0:
        return embedded
    return torch.cat([embedded, x_pass], dim=-1)
