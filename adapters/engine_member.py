"""An in-process engine on one device as a member of an upstream pool (``adapters/upstream_pool.py``).

``serve --devices cuda:0,cuda:1`` builds one engine per device and pools them, so requests are placed by the
same adapter-affinity rule as vLLM upstreams. The health probe is a real one: a one-token generation on the
bare base through the engine's own queue; a device whose engine neither produces it nor takes a single step
within ``probe_timeout_s`` (its worker died, every step fails) is unhealthy and the pool takes it out of
rotation, sending its requests to the other devices. An engine that keeps stepping is busy, not broken.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from pathlib import Path

from persona_router.adapters.engine_api import Engine, EngineStats, GenerationHandle, GenerationRequest
from persona_router.adapters.generation import SamplingConfig
from persona_router.core.errors import PersonaRouterError, QueueFullError

log = logging.getLogger(__name__)

_PROBE_IDS = itertools.count()
QuarantineHook = Callable[[str, str], None]
PROGRESS_CHECK_S = 1.0  # how often a waiting probe looks whether the engine is stepping


class EngineMember:
    """A ``PoolMember`` over an ``Engine`` (``name`` is the device, e.g. ``cuda:1``)."""

    def __init__(self, name: str, engine: Engine, *, probe_prompt: tuple[int, ...] = (0, 1, 2, 3),
                 probe_timeout_s: float = 60.0) -> None:
        self.name = name
        self.engine = engine
        self.probe_prompt = probe_prompt
        self.probe_timeout_s = probe_timeout_s

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.engine.start(loop)

    def stop(self) -> None:
        self.engine.stop()

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        return self.engine.submit(request)

    def add_adapter(self, name: str, folder: Path) -> None:
        self.engine.add_adapter(name, folder)

    def remove_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def on_quarantine(self) -> QuarantineHook | None:
        return getattr(self.engine, "on_quarantine", None)

    @on_quarantine.setter
    def on_quarantine(self, hook: QuarantineHook | None) -> None:
        """The engine's watchdog reports a poisoned adapter through ``hook`` (engines without one ignore it)."""
        if hasattr(self.engine, "on_quarantine"):
            self.engine.on_quarantine = hook

    def held(self) -> list[str]:
        """The adapters this member holds, quarantined ones included: the watchdog unmapped them, but they
        are not lost (a re-sync would put them back into service); the residency retires them."""
        names = self.engine.adapter_names()
        quarantined = getattr(self.engine, "quarantined", None)
        return names + sorted(n for n in (quarantined() if callable(quarantined) else {}) if n not in names)

    async def probe(self) -> list[str] | None:
        """One greedy token on the bare base; the engine's adapters when it came back, else None.

        The probe waits in the engine's queue like any request, so under load it can wait long: an engine
        that keeps stepping meanwhile is busy, not broken, and counts as up without waiting for the probe."""
        request = GenerationRequest(request_id=f"probe-{self.name}-{next(_PROBE_IDS)}", prompt_ids=self.probe_prompt,
                                    adapter=None, sampling=SamplingConfig(max_new_tokens=1))
        try:
            handle = self.engine.submit(request)
        except QueueFullError:  # busy, not broken
            return self.held()
        except PersonaRouterError as exc:
            log.warning("engine %s refused its probe: %s", self.name, exc)
            return None
        loop = asyncio.get_running_loop()
        answered = loop.create_task(self._answer(handle))
        steps, deadline = self.engine.stats().steps, loop.time() + self.probe_timeout_s
        while True:
            done, _ = await asyncio.wait({answered}, timeout=max(0.0, min(PROGRESS_CHECK_S, deadline - loop.time())))
            if done:
                return answered.result()
            if self.engine.stats().steps > steps:
                await self._drop(handle, answered)
                return self.held()
            if loop.time() >= deadline:
                await self._drop(handle, answered)
                log.warning("engine %s did not answer its probe within %.0f s", self.name, self.probe_timeout_s)
                return None

    async def _answer(self, handle: GenerationHandle) -> list[str] | None:
        async for event in handle:
            if event.finish_reason is not None:
                if event.finish_reason in ("stop", "length"):
                    return self.held()
                if event.finish_reason != "cancelled":  # cancelled: dropped by probe() itself
                    log.warning("engine %s failed its probe: %s", self.name, event.error or event.finish_reason)
                return None
        return None

    @staticmethod
    async def _drop(handle: GenerationHandle, answered: asyncio.Task[list[str] | None]) -> None:
        """Cancel a probe that is no longer needed and let its stream end."""
        handle.cancel()
        _, pending = await asyncio.wait({answered}, timeout=PROGRESS_CHECK_S)
        for task in pending:
            task.cancel()
