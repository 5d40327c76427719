"""``BatchedEngine``: the service's ``Engine`` on a worker thread, streaming into asyncio.

``submit`` (any thread, normally the event loop) validates the request, binds it to its adapter's
current slot, and queues it; the worker thread runs the scheduler's steps and hands each step's events
back to the request's event loop in one ``call_soon_threadsafe`` per loop. Adapters are loaded on the
caller's thread (file reading and checks) and written into a free bank slot; requests already running
keep the weights they started with (see ``lora_bank``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from persona_router.adapters.engine.config import EngineConfig
from persona_router.adapters.engine.detok import Detokenizer
from persona_router.adapters.engine.lora_bank import LoraBank
from persona_router.adapters.engine.peft_adapter import GroupShape, load_adapter
from persona_router.adapters.engine.runner import ModelRunner
from persona_router.adapters.engine.sampling import RowSampler
from persona_router.adapters.engine.scheduler import Emitted, Scheduler, Sequence
from persona_router.adapters.engine.weights import extract_weights
from persona_router.adapters.engine_api import EngineStats, GenerationRequest, TokenEvent, events_until_finished
from persona_router.adapters.generation import SamplingConfig, eos_token_ids
from persona_router.adapters.stop_strings import StopStrings
from persona_router.core.errors import (
    AdapterError,
    ConfigError,
    InvalidRequestError,
    PersonaRouterError,
    QueueFullError,
)

log = logging.getLogger(__name__)


class EngineHandle:
    """One request's stream: ``async for event in handle`` until an event has ``finish_reason``."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, engine: BatchedEngine) -> None:
        self.request_id = request_id
        self.loop = loop
        self._engine = engine
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._seq: Sequence | None = None
        self.done = False

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._events()

    def _events(self) -> AsyncIterator[TokenEvent]:
        return events_until_finished(self._queue)

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the stream ends with a ``cancelled`` event."""
        if self._seq is not None and not self._seq.finished:
            self._seq.cancelled = True
            self._engine._wake()

    def _deliver(self, event: TokenEvent) -> None:
        if event.finish_reason is not None:
            self.done = True
        self._queue.put_nowait(event)


class BatchedEngine:
    """Continuous-batching multi-adapter generation over a loaded base model (see the package docstring)."""

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig | None = None) -> None:
        import torch

        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        from persona_router.adapters.engine.triton_ops import available as triton_available
        from persona_router.adapters.engine.triton_ops import require_triton

        model_on_cuda = model.device.type == "cuda"
        nf4_mode = self.config.nf4_mode
        if nf4_mode == "auto":
            nf4_mode = "dequantize" if model_on_cuda else "kernel"
        if nf4_mode == "fused":
            require_triton()
        # ``auto``: the Triton path on CUDA for half-precision models (float32 keeps the exact torch path).
        half = getattr(model, "dtype", None) in (torch.bfloat16, torch.float16)
        kernels = _switch(self.config.kernels, model_on_cuda and triton_available() and half)
        if kernels:
            require_triton()
        from persona_router.adapters.engine.cuda_rtc import available as nvrtc_available
        from persona_router.adapters.engine.cuda_rtc import nvrtc

        dense_gemv = kernels and _switch(self.config.dense_gemv, model_on_cuda and half and nvrtc_available())
        if (kernels and model_on_cuda and self.config.gemv == "cuda") or dense_gemv:
            nvrtc()  # ConfigError naming what to install, before any weight is copied
        weights = extract_weights(model, nf4_mode=nf4_mode, gemv=kernels and model_on_cuda,
                                  gemv_kernel=self.config.gemv)
        self.nf4_mode = nf4_mode  # as resolved (applies only to a 4-bit base)
        self.vocab_size = weights.vocab_size
        self.group_shapes = {name: GroupShape(tuple(group.parts), group.in_features)
                             for name, group in weights.layers[0].groups.items()}
        self.num_layers = len(weights.layers)
        self.bank = LoraBank(self.group_shapes, num_layers=self.num_layers, capacity=self.config.max_adapters,
                             max_rank=self.config.max_rank, dtype=weights.dtype, device=weights.device)
        on_cuda = torch.device(weights.device).type == "cuda"
        use_graphs, fused, compiled = (_switch(getattr(self.config, name), on_cuda)
                                       for name in ("cuda_graphs", "fuse", "compile"))
        if use_graphs and not on_cuda:
            raise ConfigError("CUDA graphs need a CUDA device", field="cuda_graphs")
        self.runner = ModelRunner(weights, self.bank, self.config, fused=fused, compiled=compiled, kernels=kernels,
                                  dense_gemv=dense_gemv)
        decoder = prefiller = None
        if use_graphs:
            from persona_router.adapters.engine.graphs import DecodeGraphs, PrefillGraphs

            decoder = DecodeGraphs(self.runner)
            prefiller = PrefillGraphs(self.runner, decoder.pool, max_tokens=self.config.prefill_graph_tokens)
        self.graphs = decoder
        self.prefill_graphs = prefiller
        # Told (on the worker thread) when the watchdog quarantines an adapter: (name, reason). Must not block.
        self.on_quarantine: Callable[[str, str], None] | None = None
        self.scheduler = Scheduler(self.runner, self.bank, self.config, decoder=decoder, prefiller=prefiller,
                                   on_dequeue=self._dequeued, bucket_rows=use_graphs,
                                   on_quarantine=self._quarantined)
        self.stop_ids = frozenset(self.config.stop_token_ids if self.config.stop_token_ids is not None
                                  else default_stop_ids(model, tokenizer))
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._inbox: list[Sequence] = []
        self._commands: list[_Command] = []  # bank writes, run by the worker between steps
        self._pending = 0  # submitted, not yet admitted to a cache row
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seed = random.Random()
        log.info("engine ready: %d rows x %d tokens (KV cache %.1f MiB), %d adapter slots of rank %d; "
                 "graphs %s, fused %s, compiled %s, kernels %s, nf4 %s", self.config.max_batch, self.config.max_len,
                 self.runner.kv_bytes() / 2**20, self.config.max_adapters, self.config.max_rank, use_graphs, fused,
                 self.runner.pw.compiled, kernels, nf4_mode)

    # -- Engine protocol ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._thread is not None:
            return
        self._loop = loop
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            inbox, commands = self._take_pending()
        self._apply_pending(inbox, commands)
        self._dispatch(self.scheduler.fail_all("the engine stopped"))

    def submit(self, request: GenerationRequest) -> EngineHandle:
        self._validate(request)
        loop = _running_loop(self._loop)
        reason = self.scheduler.quarantined.get(request.adapter or "")
        if reason is not None:
            raise AdapterError(f"adapter {request.adapter!r} is quarantined ({reason})")
        # Everything that can refuse the request comes before the slot reference and the queue count, which
        # nothing would give back otherwise.
        sampler = RowSampler.create(request.sampling, self._seed.getrandbits(63))
        stops = StopStrings(request.stop) if request.stop else None
        with self._lock:
            if self._pending >= self.config.max_queue:
                raise QueueFullError(f"the generation queue holds {self.config.max_queue} requests; retry shortly")
            slot = self.bank.acquire(request.adapter)
            self._pending += 1
        handle = EngineHandle(request.request_id, loop, self)
        seq = Sequence(request=request, slot=slot, sampler=sampler, detok=Detokenizer(self.tokenizer),
                       stop_ids=self.stop_ids | frozenset(request.stop_token_ids), sink=handle, stops=stops)
        handle._seq = seq
        with self._lock:
            self._inbox.append(seq)
            self._wakeup.notify_all()
        return handle

    def add_adapter(self, name: str, folder: Path) -> None:
        """Read and check the folder here; the device copy happens on the worker between two steps, so it
        never overlaps a step or a CUDA graph capture. Blocks until the adapter is usable."""
        weights = load_adapter(Path(folder), groups=self.group_shapes, num_layers=self.num_layers,
                               max_rank=self.config.max_rank)

        def install() -> None:
            self.bank.install(name, weights)
            self.scheduler.quarantined.pop(name, None)

        self._in_worker(install)

    def remove_adapter(self, name: str) -> None:
        """Unmap ``name``; a quarantined adapter is already unmapped, so removing it only forgets it."""
        if name in self.scheduler.quarantined and name not in self.bank.names():
            self._in_worker(lambda: self.scheduler.quarantined.pop(name, None))
            return
        self.bank.remove(name)

    def adapter_names(self) -> list[str]:
        return self.bank.names()

    def quarantined(self) -> dict[str, str]:
        """Adapters the watchdog took out of service (name -> why) since they were last added."""
        return dict(self.scheduler.quarantined)

    def stats(self) -> EngineStats:
        with self._lock:
            queued = self._pending
        return EngineStats(queued=queued, running=len(self.scheduler.running),
                           resident_adapters=self.bank.names(), steps=self.scheduler.steps,
                           generated_tokens=self.scheduler.generated_tokens)

    def warmup(self, new_tokens: int = 4) -> None:
        """Before ``start``: run one short bare-base request through prefill and decode, so the first real
        request does not pay for kernel compilation and the batch-1 graph capture (the service's /ready)."""
        if self._thread is not None:
            raise PersonaRouterError("warm the engine up before start()")
        prompt = tuple(range(min(8, self.vocab_size)))
        request = GenerationRequest("warmup", prompt, None, SamplingConfig(max_new_tokens=new_tokens))
        seq = Sequence(request=request, slot=0, sampler=RowSampler.create(request.sampling, 0),
                       detok=Detokenizer(self.tokenizer), stop_ids=frozenset())
        with self._lock:
            self._pending += 1
        self.scheduler.add(seq)
        while self.scheduler.has_work():
            self.scheduler.step([])
        self.scheduler.steps = self.scheduler.generated_tokens = 0

    # -- worker ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while (not self._stopping and not self._inbox and not self._commands
                       and not self.scheduler.has_work()):
                    self._wakeup.wait()
                if self._stopping:
                    return
                inbox, commands = self._take_pending()
            self._apply_pending(inbox, commands)
            if not self.scheduler.has_work():
                continue
            emitted: Emitted = []
            try:
                self.scheduler.step(emitted)
            except Exception as exc:  # any failure ends the affected requests, not the engine
                log.exception("generation step failed")
                emitted.extend(self.scheduler.fail_all(f"{type(exc).__name__}: {exc}"))
            self._dispatch(emitted)

    def _quarantined(self, name: str, reason: str) -> None:
        hook = self.on_quarantine
        if hook is None:
            return
        try:
            hook(name, reason)
        except Exception:  # the owner's bookkeeping must not fail the step of every other request
            log.exception("the quarantine hook failed for %s", name)

    def _take_pending(self) -> tuple[list[Sequence], list[_Command]]:
        """Swap out the queued requests and bank commands; the caller holds ``self._lock``."""
        inbox, self._inbox = self._inbox, []
        commands, self._commands = self._commands, []
        return inbox, commands

    def _apply_pending(self, inbox: list[Sequence], commands: list[_Command]) -> None:
        # Bank writes first, so requests admitted in this round see the weights they were bound to.
        for command in commands:
            command.run()
        for seq in inbox:
            self.scheduler.add(seq)

    def _dispatch(self, emitted: Emitted) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[EngineHandle, TokenEvent]]] = defaultdict(list)
        for seq, event in emitted:
            handle: EngineHandle = seq.sink
            by_loop[handle.loop].append((handle, event))
        for loop, items in by_loop.items():
            if loop.is_closed():
                continue
            loop.call_soon_threadsafe(_deliver_all, items)

    def _in_worker(self, action: Callable[[], object]) -> None:
        """Run ``action`` on the worker thread between steps (directly when no worker runs); re-raise its error."""
        command = _Command(action)
        with self._lock:
            running = self._thread is not None and self._thread is not threading.current_thread()
            if running:
                self._commands.append(command)
                self._wakeup.notify_all()
        if not running:
            command.run()
        command.wait()

    def _dequeued(self, seq: Sequence) -> None:
        with self._lock:
            self._pending -= 1

    def _wake(self) -> None:
        with self._lock:
            self._wakeup.notify_all()

    def _validate(self, request: GenerationRequest) -> None:
        ids = request.prompt_ids
        if not ids:
            raise InvalidRequestError("the prompt is empty", field="prompt_ids")
        if len(ids) >= self.config.max_len:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens; the engine's limit is "
                                      f"{self.config.max_len - 1}", field="prompt_ids")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidRequestError(f"token ids must be in [0, {self.vocab_size})", field="prompt_ids")


class _Command:
    def __init__(self, action: Callable[[], object]) -> None:
        self.action = action
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.action()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller, who re-raises it
            self.error = exc
        finally:
            self.done.set()

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


def _switch(value: str, on_cuda: bool) -> bool:
    return value == "on" or (value == "auto" and on_cuda)


def _deliver_all(items: list[tuple[EngineHandle, TokenEvent]]) -> None:
    for handle, event in items:
        handle._deliver(event)


def _running_loop(fallback: asyncio.AbstractEventLoop | None) -> asyncio.AbstractEventLoop:
    """The loop the caller runs in (events go back there), else the one given to ``start``."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError as exc:
        if fallback is None:
            raise PersonaRouterError("submit from the event loop, or call start(loop) first") from exc
        return fallback


def default_stop_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """What ``generate`` stops on (``eos_token_ids`` of the model's generation config and the tokenizer)."""
    return eos_token_ids(tokenizer, getattr(model, "generation_config", None))
