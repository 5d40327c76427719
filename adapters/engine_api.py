"""The contract between the HTTP service and a generation engine.

The service builds a ``GenerationRequest`` per HTTP request and submits it; the engine batches requests of
different adapters into shared forward passes and streams ``TokenEvent``s back. Adapters are registered
under opaque names (the service registers ``str(AdapterKey)``, i.e. ``"<persona>@<version>"``);
``adapter=None`` means the bare base.

In this project "engine" means one thing: an object implementing ``Engine`` below. There are three: the
batched engine (``adapters/engine/``, ``BatchedEngine``, chosen by ``--engine fast``), the reference engine
(``adapters/engine_reference.py``, ``--engine reference``) and the pool of vLLM upstreams
(``adapters/upstream_pool.py``, ``--engine vllm``); the service's ``engine_kind`` and ``/ready``'s ``engine``
say which one runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from persona_router.adapters.generation import SamplingConfig
from persona_router.core.errors import PersonaRouterError


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    adapter: str | None
    sampling: SamplingConfig
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings (``adapters/stop_strings.py``): neither they nor later text is sent


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; the last event of a request has ``finish_reason`` set."""

    request_id: str
    token_id: int | None
    text: str  # the text this token adds (may be "" while a multi-byte character is incomplete)
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: str | None = None
    # With "error": the domain error when the failure is one (a request the upstream refused, no upstream up,
    # an unusable adapter), so that the service answers its status rather than a generic server error.
    failure: PersonaRouterError | None = None


@dataclass
class EngineStats:
    queued: int = 0
    running: int = 0
    resident_adapters: list[str] = field(default_factory=list)
    steps: int = 0
    generated_tokens: int = 0


class GenerationHandle(Protocol):
    """What ``Engine.submit`` returns: iterate to stream, ``cancel`` to stop (e.g. client disconnect)."""

    request_id: str

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...

    def cancel(self) -> None: ...


class Engine(Protocol):
    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def stop(self) -> None: ...

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Queue a request; raises QueueFullError when the queue is at its bound."""
        ...

    def add_adapter(self, name: str, folder: Path) -> None:
        """Load a PEFT adapter folder under ``name`` (replacing one of the same name atomically)."""
        ...

    def remove_adapter(self, name: str) -> None: ...

    def adapter_names(self) -> list[str]: ...

    def stats(self) -> EngineStats: ...


async def events_until_finished(queue: asyncio.Queue[TokenEvent]) -> AsyncIterator[TokenEvent]:
    """A handle's events from its queue, up to and including the one that finishes it."""
    while True:
        event = await queue.get()
        yield event
        if event.finish_reason is not None:
            return
