"""The reference engine: a slow but correct implementation of ``adapters.engine_api.Engine``.

It exists so the service has an engine on any machine and so faster engines have something to be checked
against. A worker thread takes queued requests, groups those that can share one ``model.generate`` call
(greedy ones, or unseeded sampled ones with equal temperature and top-p) into a static, left-padded batch
and passes PEFT's per-row ``adapter_names``: one forward pass serves rows of different adapters, and no
request ever switches a global active adapter. A seeded sampled request runs alone so that its seed
reproduces ``adapters.generation.generate_one``. Tokens stream back through a batched streamer; a cancelled
row stops through a per-row stopping criterion.

What it lacks (the fast engine's job): continuous batching (a batch runs to its end before the next one
starts), a static KV cache, and LoRA fused across adapters.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_router.adapters.base_model import LoadedBase
from persona_router.adapters.engine_api import EngineStats, GenerationRequest, TokenEvent
from persona_router.adapters.generation import eos_token_ids
from persona_router.adapters.peft_folder import check_adapter_folder
from persona_router.adapters.stop_strings import StopStrings
from persona_router.core.errors import AdapterError, ConfigError, QueueFullError

log = logging.getLogger(__name__)

BASE_ROW = "__base__"  # PEFT's name for "no adapter on this row"


@dataclass(frozen=True)
class ReferenceEngineConfig:
    max_queue: int = 64
    max_batch: int = 8
    # How long the worker waits for companions before starting a batch; short, it only gathers a burst.
    gather_s: float = 0.005

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ConfigError(f"{self.max_queue} must be at least 1", field="max_queue")
        if self.max_batch < 1:
            raise ConfigError(f"{self.max_batch} must be at least 1", field="max_batch")
        if not 0.0 <= self.gather_s <= 1.0:
            raise ConfigError(f"{self.gather_s} must be between 0 and 1 s", field="gather_s")


class ReferenceHandle:
    """The stream of one request; events are pushed from the worker thread onto the caller's loop."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, engine: ReferenceEngine) -> None:
        self.request_id = request.request_id
        self.request = request
        self._loop = loop
        self._engine = engine
        self._events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False

    def push(self, event: TokenEvent) -> None:
        """Thread-safe: deliver an event to the consumer."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()
        self._engine.drop_pending(self)

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self._events.get()
            yield event
            if event.finish_reason is not None:
                return


@dataclass
class _Row:
    handle: ReferenceHandle
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    stops: StopStrings | None = None


class _BatchStreamer:
    """Receives each step's new tokens for the whole batch from ``generate`` and fans them out per row."""

    def __init__(self, rows: list[_Row], tokenizer: Any, engine: ReferenceEngine) -> None:
        self.rows = rows
        self.tokenizer = tokenizer
        self.engine = engine
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True  # generate first hands over the prompt
            return
        step = value.reshape(-1).tolist()
        self.engine.count_step()
        for row, token in zip(self.rows, step, strict=True):
            if not row.done:
                self.engine.emit_token(row, int(token), self.tokenizer)

    def end(self) -> None:
        return None


class _RowStopper:
    """A per-row stopping criterion: rows that are cancelled or reached their own length stop."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        flags = [row.done or row.handle.cancelled.is_set() for row in self.rows]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class ReferenceEngine:
    """Static-batch generation with Hugging Face ``generate`` and PEFT ``adapter_names``."""

    def __init__(self, base: LoadedBase, config: ReferenceEngineConfig | None = None) -> None:
        self.base = base
        self.config = config or ReferenceEngineConfig()
        self._model: Any = base.model  # becomes a PeftModel when the first adapter loads
        self._adapters: dict[str, Path] = {}
        self._pending: collections.deque[ReferenceHandle] = collections.deque()
        self._cond = threading.Condition()
        self._model_lock = threading.Lock()  # adapter changes never interleave with a forward pass
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = EngineStats()
        # What ``generate`` stops on, for every request (plus a request's own ``stop_token_ids``).
        self.stop_ids = eos_token_ids(base.tokenizer, getattr(base.model, "generation_config", None))

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="reference-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for handle in pending:
            handle.push(TokenEvent(handle.request_id, None, "", finish_reason="cancelled"))
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    # -- requests -------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> ReferenceHandle:
        if self._loop is None:
            raise ConfigError("the engine is not started", field="engine")
        if request.adapter is not None and request.adapter not in self._adapters:
            raise AdapterError(f"adapter {request.adapter!r} is not loaded", field="adapter")
        handle = ReferenceHandle(request, asyncio.get_running_loop(), self)
        with self._cond:
            if len(self._pending) >= self.config.max_queue:
                raise QueueFullError(f"the generation queue is full ({self.config.max_queue} waiting)")
            self._pending.append(handle)
            self._cond.notify()
        return handle

    def drop_pending(self, handle: ReferenceHandle) -> None:
        """Remove a cancelled request that has not started yet."""
        with self._cond:
            try:
                self._pending.remove(handle)
            except ValueError:
                return  # already running: the row stopper ends it
        handle.push(TokenEvent(handle.request_id, None, "", finish_reason="cancelled"))

    # -- adapters -------------------------------------------------------------------------------------
    def add_adapter(self, name: str, folder: Path) -> None:
        """Load a PEFT folder under ``name``; the model lock keeps it out of any running batch."""
        folder = Path(folder)
        check_adapter_folder(folder)
        with self._model_lock:
            if name in self._adapters:
                self._model.delete_adapter(name)
                del self._adapters[name]
            try:
                self._load_into_model(name, folder)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                self._discard_partial(name)
                raise AdapterError(f"cannot load adapter {name!r}: {exc}", path=folder) from exc
            self._adapters[name] = folder
        log.info("engine: loaded adapter %s from %s", name, folder)

    def _load_into_model(self, name: str, folder: Path) -> None:
        from peft import PeftModel

        if isinstance(self._model, PeftModel):
            self._model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        else:
            self._model = PeftModel.from_pretrained(self._model, str(folder), adapter_name=name, is_trainable=False)
        self._model.eval()

    def _discard_partial(self, name: str) -> None:
        from peft import PeftModel

        if isinstance(self._model, PeftModel) and name in self._model.peft_config:
            with contextlib.suppress(ValueError):
                self._model.delete_adapter(name)

    def remove_adapter(self, name: str) -> None:
        with self._model_lock:
            if name not in self._adapters:
                return
            self._model.delete_adapter(name)
            del self._adapters[name]
        log.info("engine: removed adapter %s", name)

    def adapter_names(self) -> list[str]:
        return sorted(self._adapters)

    def stats(self) -> EngineStats:
        with self._cond:
            queued = len(self._pending)
        return EngineStats(queued=queued, running=self._stats.running, resident_adapters=self.adapter_names(),
                           steps=self._stats.steps, generated_tokens=self._stats.generated_tokens)

    # -- worker ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._stats.running = len(batch)
            try:
                self._generate(batch)
            except Exception as exc:  # one failing batch must not kill the server
                log.exception("engine: batch of %d failed", len(batch))
                for handle in batch:
                    handle.push(TokenEvent(handle.request_id, None, "", finish_reason="error",
                                           error=f"{type(exc).__name__}: {exc}"))
            finally:
                self._stats.running = 0

    def _next_batch(self) -> list[ReferenceHandle] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
        if self.config.gather_s:
            time.sleep(self.config.gather_s)
        with self._cond:
            if not self._pending:
                return []
            first = self._pending.popleft()
            batch = [first]
            key = _batch_key(first.request)
            if key is not None:
                for handle in list(self._pending):
                    if len(batch) >= self.config.max_batch:
                        break
                    if _batch_key(handle.request) == key:
                        self._pending.remove(handle)
                        batch.append(handle)
        return batch

    def _generate(self, batch: list[ReferenceHandle]) -> None:
        import torch

        rows = [_Row(handle, stops=StopStrings(handle.request.stop) if handle.request.stop else None)
                for handle in batch if not handle.cancelled.is_set()]
        for handle in batch:
            if handle.cancelled.is_set():
                handle.push(TokenEvent(handle.request_id, None, "", finish_reason="cancelled"))
        if not rows:
            return
        tokenizer = self.base.tokenizer
        pad = tokenizer.pad_token_id
        prompts = [list(row.handle.request.prompt_ids) for row in rows]
        width = max(len(p) for p in prompts)
        device = self.base.model.device
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        first = rows[0].handle.request
        kwargs = first.sampling.generate_kwargs()
        kwargs["max_new_tokens"] = max(row.handle.request.sampling.max_new_tokens for row in rows)
        stop_ids = sorted(self.stop_ids.union(*(row.handle.request.stop_token_ids for row in rows)))
        if stop_ids:
            kwargs["eos_token_id"] = stop_ids
        with self._model_lock:
            if self._adapters:
                kwargs["adapter_names"] = [row.handle.request.adapter or BASE_ROW for row in rows]
                missing = [n for n in kwargs["adapter_names"] if n != BASE_ROW and n not in self._adapters]
                if missing:
                    raise AdapterError(f"adapters {missing} were removed before the batch ran")
            with _seeded(first.sampling.seed, device), torch.inference_mode():
                self._model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    pad_token_id=pad,
                    streamer=_BatchStreamer(rows, tokenizer, self),
                    stopping_criteria=[_RowStopper(rows)],
                    **kwargs,
                )
        for row in rows:
            if not row.done:
                reason = "cancelled" if row.handle.cancelled.is_set() else "length"
                self._finish(row, reason)

    def emit_token(self, row: _Row, token: int, tokenizer: Any) -> None:
        """Called by the streamer for every new token of a live row."""
        request = row.handle.request
        if row.handle.cancelled.is_set():
            self._finish(row, "cancelled")
            return
        self._stats.generated_tokens += 1
        if token in self.stop_ids or token in request.stop_token_ids:
            # The stop token counts as generated (as in ``generate``) but adds no text.
            row.done = True
            row.handle.finished = True
            row.handle.push(TokenEvent(request.request_id, token, "", finish_reason="stop"))
            return
        row.tokens.append(token)
        text = tokenizer.decode(row.tokens, skip_special_tokens=True)
        # A trailing U+FFFD is half of a multi-byte character: wait for the rest before sending it.
        delta = "" if text.endswith("\ufffd") else text[len(row.text):]
        if delta:
            row.text = text
        if row.stops is not None:
            delta, reached = row.stops.feed(delta)
            if reached:
                row.done = True
                row.handle.finished = True
                row.handle.push(TokenEvent(request.request_id, token, delta, finish_reason="stop"))
                return
            if len(row.tokens) >= request.sampling.max_new_tokens:
                delta += row.stops.flush()
        row.handle.push(TokenEvent(request.request_id, token, delta))
        if len(row.tokens) >= request.sampling.max_new_tokens:
            self._finish(row, "length")

    def count_step(self) -> None:
        self._stats.steps += 1

    def _finish(self, row: _Row, reason: str) -> None:
        row.done = True
        row.handle.finished = True
        row.handle.push(TokenEvent(row.handle.request_id, None, "", finish_reason=reason))


@contextlib.contextmanager
def _seeded(seed: int | None, device: Any) -> Iterator[None]:
    """Seed one batch's sampling (``generate`` draws from the global generators) without touching what other
    requests draw: the generators' states are restored afterwards, and of the GPUs only this engine's is
    seeded (``torch.manual_seed`` would reseed every device, including other engines' mid-generation)."""
    import torch

    if seed is None:
        yield
        return
    gpus = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.default_generator.manual_seed(seed)
        for gpu in gpus:
            with torch.cuda.device(gpu):
                torch.cuda.manual_seed(seed)
        yield


def _batch_key(request: GenerationRequest) -> tuple[float, float] | None:
    """Requests with equal keys can share one ``generate`` call; ``None`` means it must run alone."""
    sampling = request.sampling
    if sampling.greedy:
        return (0.0, 1.0)
    if sampling.seed is not None:
        return None
    return (sampling.temperature, sampling.top_p)
