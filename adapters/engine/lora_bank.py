"""Resident LoRA adapters stacked per (layer, group), applied to a mixed batch in one product pair.

Layout: for every layer and linear group, ``A`` is ``[capacity, R, in]`` and ``Bt`` (B transposed) is
``[capacity, R, out]``, where ``R = max_rank * parts`` (Llama's q/k/v fuse three parts, so their ranks
stack and B is block-diagonal). Slot ``s >= 1`` lives at index ``s - 1``; slot 0 means "no adapter" and
has no storage. An adapter of rank ``r < max_rank`` is zero-padded, which adds exact zeros.

Per step, with ``m`` the highest slot id present (rounded up to a power of two), every row computes

    t = x @ A[:m].reshape(m*R, in).T        # all m adapters' down-projections in one product
    y = where(own(slot), t, 0) @ Bt[:m].reshape(m*R, out) * scaling[slot]

so rows of different adapters share two matrix products per group and no Python loop runs over adapters.
The mask *selects* each row's own adapter's columns and puts exact zeros elsewhere, so in float32 each
row gets the same ``x A^T B^T s`` that PEFT computes for it alone (up to summation order inside the
products).

Isolation between rows: a mask that multiplied would turn an inf or NaN in another adapter's columns
(a diverged adapter, an overflow) into NaN for every row (``inf * 0 = NaN``); selecting replaces them by
zero. The second product adds ``0 * Bt`` for foreign slots, which is zero only if ``Bt`` is finite, so the
bank refuses to store non-finite weights (``install``). Together: no value of one slot reaches another
slot's rows, whatever that slot computes at run time.

Slot life cycle: ``install`` writes a free slot and maps the name to it; a replaced or removed adapter's
old slot is *retired*: requests that acquired it keep using its weights until they release it, then it
is free again. So a request always finishes on the weights it started with.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from persona_router.adapters.engine.peft_adapter import AdapterWeights, GroupShape
from persona_router.core.errors import AdapterError, QueueFullError

log = logging.getLogger(__name__)


@dataclass
class LoraBatch:
    """The per-step view of which rows use which slot; built inside the (possibly graph-captured) step."""

    slot_ids: Any  # [N] int64, one per token row
    m: int  # slots 1..m take part; 0 means no row has an adapter
    fused: bool = False  # scaling applied to the selected terms and the update added by addmm (see ``apply``)
    row_scaling: Any = None  # [N, 1] in the compute dtype
    masks: dict[int, Any] = field(default_factory=dict)  # rank R -> [N, m*R] bool: the row's own slot's columns


@dataclass
class _Slot:
    name: str | None = None
    refs: int = 0
    retired: bool = False
    rank: int = 0


class LoraBank:
    """Fixed-capacity stacked storage for resident adapters, with reference-counted slots."""

    def __init__(self, groups: dict[str, GroupShape], *, num_layers: int, capacity: int, max_rank: int,
                 dtype: Any, device: Any) -> None:
        import torch

        self.groups = groups
        self.num_layers = num_layers
        self.capacity = capacity
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.ranks = {name: max_rank * len(shape.parts) for name, shape in groups.items()}
        self.a: list[dict[str, Any]] = []
        self.bt: list[dict[str, Any]] = []
        for _ in range(num_layers):
            self.a.append({g: torch.zeros(capacity, self.ranks[g], s.in_features, dtype=dtype, device=device)
                           for g, s in groups.items()})
            self.bt.append({g: torch.zeros(capacity, self.ranks[g], sum(n for _, n in s.parts), dtype=dtype,
                                           device=device) for g, s in groups.items()})
        # Indexed by slot id; slot 0 scales by zero.
        self.scaling = torch.zeros(capacity + 1, dtype=dtype, device=device)
        self._slots = [_Slot() for _ in range(capacity + 1)]
        self._names: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- slot management (any thread) -------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._names)

    def slot_of(self, name: str) -> int:
        with self._lock:
            if name not in self._names:
                raise AdapterError(f"no adapter named {name!r} is loaded; loaded: {', '.join(sorted(self._names))}")
            return self._names[name]

    def install(self, name: str, weights: AdapterWeights) -> int:
        """Write ``weights`` into a free slot and point ``name`` at it; the old slot of ``name`` retires.

        Non-finite weights are refused: stored, they would reach every row (see the module docstring)."""
        check_finite(weights)
        with self._lock:
            slot = self._free_slot()
            self._slots[slot] = _Slot(name=name, rank=weights.rank)  # reserved while we write
        try:
            self._write(slot, weights)
        except BaseException:
            with self._lock:
                self._slots[slot] = _Slot()
            raise
        with self._lock:
            old = self._names.get(name)
            self._names[name] = slot
            if old is not None:
                self._retire(old)
        log.info("adapter %s in slot %d (rank %d, scaling %g)", name, slot, weights.rank, weights.scaling)
        return slot

    def remove(self, name: str) -> None:
        with self._lock:
            slot = self._names.pop(name, None)
            if slot is None:
                raise AdapterError(f"no adapter named {name!r} is loaded")
            self._retire(slot)

    def quarantine(self, slot: int) -> str | None:
        """Stop new requests from using ``slot``: unmap the name that points at it (if any still does) and
        retire the slot, which frees once its running requests finish. Returns that name."""
        with self._lock:
            name = next((n for n, s in self._names.items() if s == slot), None)
            if name is not None:
                del self._names[name]
                self._retire(slot)
            return name

    def acquire(self, name: str | None) -> int:
        """The slot a new request will use for its whole life (0 for the bare base)."""
        if name is None:
            return 0
        with self._lock:
            slot = self._names.get(name)
            if slot is None:
                raise AdapterError(f"no adapter named {name!r} is loaded; loaded: {', '.join(sorted(self._names))}")
            self._slots[slot].refs += 1
            return slot

    def release(self, slot: int) -> None:
        if slot == 0:
            return
        with self._lock:
            state = self._slots[slot]
            state.refs -= 1
            if state.retired and state.refs == 0:
                self._slots[slot] = _Slot()

    def in_use(self) -> int:
        with self._lock:
            return sum(1 for s in self._slots[1:] if s.name is not None)

    def _free_slot(self) -> int:
        for slot in range(1, self.capacity + 1):
            if self._slots[slot].name is None:
                return slot
        # Busy, not broken: retired slots free up as their requests finish, so the caller retries (a 429), and
        # the residency must not record a refusal of a healthy adapter over it.
        raise QueueFullError(f"all {self.capacity} adapter slots are in use (retired slots free up when their "
                             "requests finish); retry shortly, or remove an adapter or raise max_adapters")

    def _retire(self, slot: int) -> None:
        state = self._slots[slot]
        if state.refs == 0:
            self._slots[slot] = _Slot()
        else:
            state.retired = True

    def _write(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter into its slot; only this slot's rows change, so running steps are unaffected."""
        import torch

        index = slot - 1
        rank = weights.rank
        with torch.no_grad():
            for layer in range(self.num_layers):
                for group, shape in self.groups.items():
                    a_dst, bt_dst = self.a[layer][group][index], self.bt[layer][group][index]
                    pair = weights.tensors.get((layer, group))
                    if pair is None:
                        a_dst.zero_()
                        bt_dst.zero_()
                        continue
                    a_src, b_src = pair
                    a_new = torch.zeros_like(a_dst, device="cpu")
                    bt_new = torch.zeros_like(bt_dst, device="cpu")
                    for part in range(len(shape.parts)):
                        dst, src = part * self.max_rank, part * rank
                        a_new[dst:dst + rank] = a_src[src:src + rank].to(self.dtype)
                        bt_new[dst:dst + rank] = b_src[:, src:src + rank].T.to(self.dtype)
                    a_dst.copy_(a_new)
                    bt_dst.copy_(bt_new)
            self.scaling[slot] = weights.scaling

    # -- the hot path (worker thread) --------------------------------------------------------------

    def batch(self, slot_ids: Any, m: int, *, fused: bool = False) -> LoraBatch:
        """Per-step masks and scalings for rows whose slot ids are ``slot_ids`` (slots above ``m`` unused)."""
        import torch

        lora = LoraBatch(slot_ids=slot_ids, m=m, fused=fused)
        if m == 0:
            return lora
        lora.row_scaling = self.scaling[slot_ids].unsqueeze(-1)
        own = slot_ids.unsqueeze(-1) == torch.arange(1, m + 1, device=slot_ids.device)
        for rank in set(self.ranks.values()):
            lora.masks[rank] = own.unsqueeze(-1).expand(-1, m, rank).reshape(-1, m * rank)
        return lora

    def apply(self, layer: int, group: str, x: Any, base_out: Any, lora: LoraBatch) -> Any:
        """``base_out + LoRA(x)`` for every row's own adapter; ``x`` is [N, in], ``base_out`` [N, out].

        Exact mode computes PEFT's ``base + (x A^T B^T) * s`` in that order; fused mode computes
        ``base += (x A^T * s) B^T`` in one ``addmm`` (the same up to rounding; exact for power-of-two s).
        """
        import torch

        if lora.m == 0:
            return base_out
        rank = self.ranks[group]
        a = self.a[layer][group][:lora.m].reshape(lora.m * rank, -1)
        bt = self.bt[layer][group][:lora.m].reshape(lora.m * rank, -1)
        t = x.to(self.dtype) @ a.T
        if lora.fused:
            t = t * lora.row_scaling
        # Select, never multiply: foreign slots' terms become exact zeros even when they are inf or NaN.
        t = torch.where(lora.masks[rank], t, 0.0)
        if lora.fused and base_out.dtype == self.dtype:
            return base_out.addmm_(t, bt)
        if lora.fused:
            return base_out + (t @ bt).to(base_out.dtype)
        return base_out + ((t @ bt) * lora.row_scaling).to(base_out.dtype)


def check_finite(weights: AdapterWeights) -> None:
    """Raise ``AdapterError`` naming the first (layer, group) whose A or B holds an inf or NaN."""
    import torch

    for (layer, group), pair in sorted(weights.tensors.items()):
        for label, tensor in zip("AB", pair, strict=True):
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterError(f"layer {layer} {group} lora_{label} holds non-finite values (inf or NaN); "
                                   "a diverged training run? retrain or publish an earlier version")


def slot_bucket(max_slot: int, capacity: int) -> int:
    """Round the highest slot in a batch up to a power of two, so few distinct step shapes exist."""
    if max_slot == 0:
        return 0
    bucket = 1
    while bucket < max_slot:
        bucket *= 2
    return min(bucket, capacity)
