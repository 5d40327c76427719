"""A pool of generation upstreams behind the one ``Engine`` interface, with adapter affinity.

A *member* is anything that generates: a vLLM server reached over HTTP (``adapters/vllm_upstream.py``) or an
in-process engine on one device. The pool is itself an ``Engine``, so the service does not know how many
members there are or what they are.

- **Affinity.** Each adapter name is ranked over the members by rendezvous (highest-random-weight) hashing:
  ``sha256(adapter | member)`` per member, highest first. The order is stable, and adding or removing a
  member moves only the adapters whose first choice it was. An adapter is loaded eagerly on its first
  ``replicas`` healthy members (its *home*); a request goes to the first healthy member in its ranking that
  has fewer than ``max_in_flight`` requests, so a persona's requests land where its adapter already is and
  spill over to the next member only when that one is saturated (the adapter then loads there on demand).
  When every member is saturated the request waits on the least loaded one, up to ``max_queue`` requests
  beyond the pool's total capacity; past that ``submit`` raises ``QueueFullError``.
- **Failures.** A member's stream raises ``UpstreamFailedError`` when the member fails the request (it is
  unreachable, answers 5xx, drops the stream, or lost the adapter in a restart); an in-process member reports
  an ``error`` event and then fails its probe. The member is marked down and the request goes to the next
  member of its ranking. Before its first token it is simply submitted again; after it, it *continues*: the
  next member gets the prompt plus the tokens already delivered and the remaining token budget, so nothing
  delivered is repeated and nothing is lost (under greedy decoding the continuation is exactly the answer the
  first member would have given; sampled answers continue from a new random state).
- **Health.** A background task probes every member each ``health_interval_s``. A probe returns the adapter
  names the member holds (None when it is unhealthy). A member that is down is skipped; when it answers
  again, when it no longer holds adapters the pool loaded into it (it restarted between two probes), or when
  it still holds an adapter the pool removed (it was down, re-syncing or failed the unload then), it is
  re-synced: adapters the pool no longer serves are unloaded, its home adapters are loaded again.

Bookkeeping is guarded by one ``threading.Lock`` because ``add_adapter`` / ``remove_adapter`` are called from
worker threads (``AdapterResidency`` runs them with ``asyncio.to_thread``) while requests run on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from persona_router.adapters.continued_text import Decode
from persona_router.adapters.engine_api import EngineStats, GenerationHandle, GenerationRequest
from persona_router.adapters.pool_handle import PoolHandle
from persona_router.adapters.upstream_member import MemberState, PoolConfig, PoolMember, rendezvous_order
from persona_router.core.errors import (
    AdapterError,
    ConfigError,
    PersonaRouterError,
    QueueFullError,
    UpstreamFailedError,
    UpstreamUnavailableError,
)

log = logging.getLogger(__name__)


class UpstreamPool:
    """An ``Engine`` over several members with adapter affinity, spill-over, retries and health checks."""

    def __init__(self, members: Sequence[PoolMember], config: PoolConfig | None = None, *,
                 decode: Decode | None = None) -> None:
        """``decode`` (token ids -> text): how a request continued on another member after a failure mid-answer
        gets text that joins what was streamed (``adapters/continued_text.py``); without it the next member's
        own text is streamed."""
        if not members:
            raise ConfigError("a pool needs at least one member", field="upstreams")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ConfigError(f"member names must be unique: {', '.join(names)}", field="upstreams")
        self.config = config or PoolConfig()
        self.decode = decode
        self.members = {m.name: MemberState(m) for m in members}
        self._catalogue: dict[str, Path] = {}
        self._removed: set[str] = set()  # removed, but some member may still hold it: dropped at its re-sync
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._on_quarantine: Callable[[str, str], None] | None = None

    # -- Engine ----------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for state in self.members.values():
            state.member.start(loop)
        self._health_task = loop.create_task(self._health_loop())

    def stop(self) -> None:
        if self._health_task is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._health_task.cancel)
        for state in self.members.values():
            state.member.stop()

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        with self._lock:
            up = [s for s in self.members.values() if s.up]
            if not up:
                raise UpstreamUnavailableError(f"no generation upstream is up ({self._down_summary()}); "
                                               "retry shortly")
            waiting = sum(max(0, s.in_flight - self.config.max_in_flight) for s in up)
            if waiting >= self.config.max_queue:
                raise QueueFullError(f"all {len(up)} upstreams are saturated and {waiting} requests wait; "
                                     "retry shortly")
        return PoolHandle(self, request, self.decode)

    def add_adapter(self, name: str, folder: Path) -> None:
        """Register ``name`` and load it on its home members (from a worker thread)."""
        with self._lock:
            replaced = name in self._catalogue and self._catalogue[name] != Path(folder)
            self._catalogue[name] = Path(folder)
            self._removed.discard(name)
        if replaced:
            self._unload_everywhere(name)
        loaded = 0
        errors = []
        for state in self._ranked(name):
            if loaded >= self.config.replicas:
                break
            try:
                self._load_on(state, name)
                loaded += 1
            except UpstreamFailedError as exc:
                self.mark_down(state, str(exc))
                errors.append(f"{state.name}: {exc}")
            except QueueFullError as exc:  # no free adapter slot there now: busy, not down
                errors.append(f"{state.name}: {exc}")
        if loaded == 0 and errors:
            log.warning("adapter %s is registered but no upstream could load it now (%s); it loads on first use",
                        name, "; ".join(errors))

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            self._catalogue.pop(name, None)
        self._unload_everywhere(name)

    def adapter_names(self) -> list[str]:
        with self._lock:
            return list(self._catalogue)

    def stats(self) -> EngineStats:
        stats = EngineStats(resident_adapters=self.adapter_names())
        for state in self.members.values():
            stats.running += state.in_flight
            stats.queued += max(0, state.in_flight - self.config.max_in_flight)
        return stats

    @property
    def on_quarantine(self) -> Callable[[str, str], None] | None:
        return self._on_quarantine

    @on_quarantine.setter
    def on_quarantine(self, hook: Callable[[str, str], None] | None) -> None:
        """Wire the watchdog of every in-process member (``EngineMember``) to ``hook``, as the service does
        for a single engine; vLLM members have none."""
        self._on_quarantine = hook
        for state in self.members.values():
            if hasattr(state.member, "on_quarantine"):
                state.member.on_quarantine = hook

    def describe(self) -> list[dict[str, Any]]:
        """Per-member state for metrics and ``/ready``."""
        with self._lock:
            return [{"name": s.name, "up": s.up, "in_flight": s.in_flight, "adapters": sorted(s.held),
                     "requests": s.requests, "failures": s.failures, "retries": s.retries,
                     "adapter_loads": s.adapter_loads, "last_error": s.last_error} for s in self.members.values()]

    # -- placement -------------------------------------------------------------------------------------
    def ranking(self, adapter: str | None) -> list[str]:
        """Member names in the order ``adapter``'s requests try them (all members, up or not)."""
        return rendezvous_order(adapter or "", list(self.members))

    def _ranked(self, adapter: str, *, exclude: Sequence[str] = ()) -> list[MemberState]:
        return [self.members[n] for n in self.ranking(adapter) if self.members[n].up and n not in exclude]

    def choose(self, adapter: str | None, *, exclude: Sequence[str] = ()) -> MemberState:
        """The member for one request: the first unsaturated healthy member of the adapter's ranking (the least
        loaded one for the bare base); when all are saturated, the least loaded, ties in ranking order."""
        with self._lock:
            candidates = self._ranked(adapter or "", exclude=exclude)
            if not candidates:
                raise UpstreamUnavailableError(f"no generation upstream is up ({self._down_summary()}); "
                                               "retry shortly")
            if adapter is None:
                chosen = min(candidates, key=lambda s: s.in_flight)
            else:
                free = [s for s in candidates if s.in_flight < self.config.max_in_flight]
                chosen = free[0] if free else min(candidates, key=lambda s: s.in_flight)
            chosen.in_flight += 1
            chosen.requests += 1
            return chosen

    def _load_on(self, state: MemberState, name: str) -> None:
        """Make ``name`` resident on one member (blocking; worker thread). One load per member at a time."""
        with state.load_lock:
            with self._lock:
                if name in state.held:
                    return
                folder = self._catalogue.get(name)
            if folder is None:
                raise AdapterError(f"adapter {name!r} is not registered with the pool")
            state.member.add_adapter(name, folder)
            with self._lock:
                state.held.add(name)
                state.adapter_loads += 1
        log.info("adapter %s loaded on upstream %s", name, state.name)

    def _unload_everywhere(self, name: str) -> None:
        """Unload ``name`` from every member holding it. A member that is down (or being re-synced) or whose
        unload fails is left to the health check: ``name`` joins ``_removed``, which a probe that still
        finds it there re-syncs away."""
        for state in self.members.values():
            with state.load_lock:  # no load on this member runs meanwhile
                with self._lock:
                    held = name in state.held
                    state.held.discard(name)
                    if not state.up:
                        self._removed.add(name)
                        continue
                if not held:
                    continue
                try:
                    state.member.remove_adapter(name)
                except PersonaRouterError as exc:
                    log.warning("could not unload %s from upstream %s (retried at its next probe): %s", name,
                                state.name, exc)
                    with self._lock:
                        self._removed.add(name)

    async def ensure_adapter(self, state: MemberState, name: str) -> None:
        with self._lock:
            if name in state.held:
                return
        await asyncio.to_thread(self._load_on, state, name)

    # -- health ----------------------------------------------------------------------------------------
    def mark_down(self, state: MemberState, reason: str) -> None:
        with self._lock:
            was_up = state.up
            state.up = False
            state.failures += 1
            state.last_error = reason
        if was_up:
            log.warning("upstream %s is down: %s", state.name, reason)

    def release(self, state: MemberState, *, retried: bool) -> None:
        """A request left ``state`` (``retried``: it failed there and goes to another member)."""
        with self._lock:
            state.in_flight -= 1
            if retried:
                state.retries += 1

    def forget(self, state: MemberState, adapter: str) -> None:
        """``state`` does not hold ``adapter`` any more (it restarted): the next use loads it again."""
        with self._lock:
            state.held.discard(adapter)

    def _down_summary(self) -> str:
        return "; ".join(f"{s.name}: {s.last_error or 'down'}" for s in self.members.values() if not s.up) or "none"

    async def check(self, state: MemberState) -> bool:
        """Probe one member; re-sync it when it comes back or lost adapters. Returns whether it is up."""
        async with state.check_lock:
            return await self._check(state)

    async def _check(self, state: MemberState) -> bool:
        try:
            reported = await state.member.probe()
        except PersonaRouterError as exc:
            reported = None
            state.last_error = str(exc)
        if reported is None:
            if state.up:
                self.mark_down(state, state.last_error or "health probe failed")
            return False
        with self._lock:
            lost = state.held - set(reported)
            stale = {n for n in reported if n in self._removed and n not in self._catalogue}
            needs_sync = not state.up or bool(lost) or bool(stale)
        if needs_sync:
            if state.up and lost:
                log.warning("upstream %s lost adapters %s (restarted?); re-syncing", state.name, sorted(lost))
            elif state.up:
                log.info("upstream %s still holds removed adapters %s; re-syncing", state.name, sorted(stale))
            try:
                await asyncio.to_thread(self._resync, state, reported)
            except (PersonaRouterError, OSError) as exc:
                self.mark_down(state, f"re-sync failed: {exc}")
                return False
            with self._lock:
                came_back = not state.up
                state.up = True
                state.last_error = None
            if came_back:
                log.info("upstream %s is up", state.name)
        return True

    def _resync(self, state: MemberState, reported: list[str]) -> None:
        """Align a member with the catalogue: drop what the pool no longer serves, load its home adapters."""
        with self._lock:
            catalogue = dict(self._catalogue)
            state.held = {n for n in reported if n in catalogue}
        for name in reported:
            if name in self._removed and name not in catalogue:
                state.member.remove_adapter(name)
        for name in catalogue:
            home = rendezvous_order(name, list(self.members))[: self.config.replicas]
            if state.name not in home:
                continue
            try:
                self._load_on(state, name)
            except AdapterError as exc:  # this adapter's fault, not the upstream's: it keeps serving the rest
                log.warning("upstream %s refused adapter %s at re-sync: %s", state.name, name, exc)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.check(s) for s in self.members.values()))
            await asyncio.sleep(self.config.health_interval_s)

    async def wait_up(self, timeout_s: float) -> int:
        """Probe until at least one member is up or the time is over; returns how many are up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            results = await asyncio.gather(*(self.check(s) for s in self.members.values()))
            if any(results) or loop.time() >= deadline:
                return sum(results)
            await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))
