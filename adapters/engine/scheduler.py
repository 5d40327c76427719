"""Continuous batching: requests join between decode steps and leave as soon as they finish.

One ``step`` (a) drops cancelled requests, (b) admits waiting requests into free cache rows and prefills
them together (their first token comes out of the prefill), then (c) decodes one token for every running
request in a single batched forward pass. The scheduler is single-threaded: the engine's worker thread
is its only caller.

Watchdog: a row whose logits hold an inf or NaN ends its request with an error, and the adapter it ran
is quarantined (no new request gets it; ``on_quarantine`` tells the owner). The other rows carry on: the
forward pass keeps rows apart (see ``lora_bank`` and ``ModelRunner._reset_rows``).
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from persona_router.adapters.engine.config import EngineConfig
from persona_router.adapters.engine.detok import Detokenizer
from persona_router.adapters.engine.lora_bank import LoraBank, slot_bucket
from persona_router.adapters.engine.runner import ModelRunner
from persona_router.adapters.engine.sampling import RowSampler, choose_tokens
from persona_router.adapters.engine_api import GenerationRequest, TokenEvent
from persona_router.adapters.stop_strings import StopStrings

log = logging.getLogger(__name__)

Decoder = Callable[[int, int, int], Any]  # (rows, kv_len, slot bucket) -> logits
Prefiller = Callable[[list[int], list[list[int]], list[int], int], Any]  # (rows, prompts, slots, bucket) -> logits
QuarantineHook = Callable[[str, str], None]  # (adapter name, reason), called on the worker thread


@dataclass(eq=False)
class Sequence:
    """One request's life inside the engine."""

    request: GenerationRequest
    slot: int  # LoRA slot, acquired at submit and released at finish
    sampler: RowSampler
    detok: Detokenizer
    stop_ids: frozenset[int]
    stops: StopStrings | None = None  # the request's stop strings, if any
    sink: Any = None  # where the engine delivers this request's events
    row: int = -1
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False  # set from any thread; read by the worker between steps
    finished: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def position(self) -> int:
        """Where the last generated token goes in the cache when it is fed back."""
        return self.prompt_len + len(self.generated) - 1


Emitted = list[tuple[Sequence, TokenEvent]]


class Scheduler:
    def __init__(self, runner: ModelRunner, bank: LoraBank, config: EngineConfig, *,
                 decoder: Decoder | None = None, prefiller: Prefiller | None = None,
                 on_dequeue: Callable[[Sequence], None] | None = None,
                 bucket_rows: bool = False, on_quarantine: QuarantineHook | None = None) -> None:
        self.runner = runner
        self.bank = bank
        self.config = config
        self.decoder: Decoder = decoder or runner.decode
        self.prefiller: Prefiller = prefiller or runner.prefill
        self.on_dequeue = on_dequeue or (lambda seq: None)
        # Graph replay wants few distinct batch shapes; eager CPU runs want no padding rows.
        self.bucket_rows = bucket_rows
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self._free_rows = list(range(config.max_batch))
        heapq.heapify(self._free_rows)
        self.steps = 0
        self.generated_tokens = 0
        self.on_quarantine = on_quarantine
        self.quarantined: dict[str, str] = {}  # adapter name -> why

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self, out: Emitted) -> None:
        """One scheduling step; events are appended to ``out`` as they happen, so a step that fails half way
        still hands over the events of the requests it already finished."""
        self._reap_cancelled(out)
        admitted = self._admit()
        if admitted:
            self._prefill(admitted, out)
        if self.running:
            self._decode(out)

    def fail_all(self, message: str) -> Emitted:
        """End every request with an error event (after a failed forward pass, or at shutdown)."""
        out: Emitted = []
        for seq in list(self.running.values()) + list(self.waiting):
            if seq in self.waiting:
                self.on_dequeue(seq)
            out.append((seq, TokenEvent(seq.request.request_id, None, "", finish_reason="error", error=message)))
            self._finish(seq)
        self.waiting.clear()
        return out

    # -- phases --------------------------------------------------------------------------------------

    def _reap_cancelled(self, out: Emitted) -> None:
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self.on_dequeue(seq)
            self._cancel(seq, out)
        for seq in [s for s in self.running.values() if s.cancelled]:
            self._cancel(seq, out)

    def _cancel(self, seq: Sequence, out: Emitted) -> None:
        out.append((seq, TokenEvent(seq.request.request_id, None, "", finish_reason="cancelled")))
        self._finish(seq)

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        longest = 0
        while self.waiting and self._free_rows:
            seq = self.waiting[0]
            longest_after = max(longest, seq.prompt_len)
            if admitted and longest_after * (len(admitted) + 1) > self.config.max_prefill_tokens:
                break
            self.waiting.popleft()
            self.on_dequeue(seq)
            seq.row = heapq.heappop(self._free_rows)
            self.running[seq.row] = seq
            admitted.append(seq)
            longest = longest_after
        return admitted

    def _prefill(self, admitted: list[Sequence], out: Emitted) -> None:
        slots = [seq.slot for seq in admitted]
        logits = self.prefiller([seq.row for seq in admitted], [list(seq.request.prompt_ids) for seq in admitted],
                                     slots, slot_bucket(max(slots), self.bank.capacity))
        finite = _finite_rows(logits)
        tokens = choose_tokens(logits, [seq.sampler if ok else None for seq, ok in zip(admitted, finite, strict=True)])
        for seq, token, ok in zip(admitted, tokens, finite, strict=True):
            if ok:
                self._accept(seq, token, out)
            else:
                self._poisoned(seq, out)

    def _decode(self, out: Emitted) -> None:
        import torch

        n = max(self.running) + 1
        rows = _bucket(n, self.config.max_batch) if self.bucket_rows else n
        inputs = [[0, 0, 0] for _ in range(rows)]  # rows without a request: token 0 at position 0, no adapter
        for row, seq in self.running.items():
            inputs[row] = [seq.generated[-1], seq.position, seq.slot]
        self.runner.step_inputs[:rows].copy_(torch.tensor(inputs, dtype=torch.long))
        kv_len = self.runner.kv_len_for(max(r[1] for r in inputs))
        logits = self.decoder(rows, kv_len, slot_bucket(max(r[2] for r in inputs), self.bank.capacity))
        # One transfer for the watchdog and greedy rows: the step computed argmax and finiteness on the device.
        greedy, flags = self.runner.summary[:, :n].tolist()
        finite = [bool(f) for f in flags]
        samplers = [self.running[row].sampler if row in self.running and finite[row] else None for row in range(n)]
        chosen = choose_tokens(logits[:n], samplers, greedy)
        self.steps += 1
        for row, seq in list(self.running.items()):
            if finite[row]:
                self._accept(seq, chosen[row], out)
            else:
                self._poisoned(seq, out)

    def _poisoned(self, seq: Sequence, out: Emitted) -> None:
        """The watchdog: fail this request only, and quarantine its adapter so no new request gets it."""
        name = self.bank.quarantine(seq.slot) if seq.slot else None
        adapter = seq.request.adapter
        message = "the model produced non-finite values (inf or NaN) for this request"
        if adapter is not None:
            message += f"; adapter {adapter!r} is quarantined"
        log.error("request %s: non-finite logits at token %d (adapter %s); failing it", seq.request.request_id,
                  len(seq.generated), adapter or "none")
        out.append((seq, TokenEvent(seq.request.request_id, None, "", finish_reason="error", error=message)))
        self._finish(seq)
        if name is not None:
            reason = f"non-finite logits while answering request {seq.request.request_id}"
            self.quarantined[name] = reason
            log.error("adapter %s quarantined: %s", name, reason)
            if self.on_quarantine is not None:
                self.on_quarantine(name, reason)

    def _accept(self, seq: Sequence, token: int, out: Emitted) -> None:
        seq.generated.append(token)
        self.generated_tokens += 1
        rid = seq.request.request_id
        if token in seq.stop_ids:
            out.append((seq, TokenEvent(rid, token, "", finish_reason="stop")))
            self._finish(seq)
            return
        text = seq.detok.step(token)
        if seq.stops is not None:
            text, reached = seq.stops.feed(text)
            if reached:
                out.append((seq, TokenEvent(rid, token, text, finish_reason="stop")))
                self._finish(seq)
                return
        full = len(seq.generated) >= seq.request.sampling.max_new_tokens or seq.position >= self.config.max_len
        if full and seq.stops is not None:
            text += seq.stops.flush()
        out.append((seq, TokenEvent(rid, token, text, finish_reason="length" if full else None)))
        if full:
            self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq.row >= 0 and self.running.get(seq.row) is seq:
            del self.running[seq.row]
            heapq.heappush(self._free_rows, seq.row)
        self.bank.release(seq.slot)


def _finite_rows(logits: Any) -> list[bool]:
    import torch

    return [bool(v) for v in torch.isfinite(logits).all(dim=-1).tolist()]


def _bucket(n: int, cap: int) -> int:
    """Round a row count up to a power of two (fewer distinct shapes for CUDA graphs)."""
    size = 1
    while size < n:
        size *= 2
    return min(size, cap)
