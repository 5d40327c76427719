"""Which adapter versions are resident in the engine, and which one serves each persona.

The registry (``adapters/registry.py``) says what exists on disk; this module decides what is loaded:

- The *live* version of a persona is its ``LATEST``, unless that version is refused (other base
  fingerprint, corrupt files) or disabled by an admin, in which case the newest usable older version
  serves; with none, the persona is prompt-only (base model plus its system prompt).
- At most ``max_resident`` adapters are resident. Loading one more evicts the least recently used idle
  adapter that is not live (live versions are pinned); only a request that needs a non-resident version
  may evict an idle live one, which reloads on its next use. A reload never evicts live versions. When
  every slot is serving a request the load fails with ``QueueFullError`` (429: retry shortly).
- Each version is registered in the engine under its own name, ``str(AdapterKey)`` (``persona@version``).
  A new version is loaded beside the old one and only then becomes live, and an adapter that requests are
  using is removed only after the last of them finishes: a hot swap never drops a request in flight.
- A refused version is remembered with the stamp of its files so a periodic reload does not retry it
  until its files change; the other adapters keep serving. So is a version the engine's watchdog
  quarantined (it produced non-finite values): the persona falls back to its next usable version.
- A version disabled by an admin is recorded in the adapters folder (``DISABLED.json``, written
  atomically), so it stays disabled across restarts and for every server reading that folder.
- Errors shown to clients name persona and version, never a file-system path (the log has those).

All methods run on the event loop; disk reads and engine loads run in worker threads. One asyncio lock
serialises loads and unloads. What the adapters folder says (scans, stamps, checks, ``DISABLED.json``) is
read and written by the base class in ``adapters/residency_folder.py``; the value types are in
``adapters/residency_types.py``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from persona_router.adapters.engine_api import Engine
from persona_router.adapters.registry import AdapterRegistry
from persona_router.adapters.residency_folder import ResidencyFolder
from persona_router.adapters.residency_types import AdapterNotFoundError as AdapterNotFoundError  # re-exported
from persona_router.adapters.residency_types import EventHook, Lease, _rebuild_error, _Refusal, engine_name
from persona_router.adapters.residency_types import Stamp as Stamp  # re-exported
from persona_router.core.errors import (
    AdapterError,
    AdapterIncompatibleError,
    ConfigError,
    PersonaRouterError,
    QueueFullError,
    UnknownPersonaError,
    public_message,
)
from persona_router.core.names import AdapterKey

log = logging.getLogger(__name__)


class AdapterResidency(ResidencyFolder):
    """Keeps the engine's adapters in step with the registry within a residency bound."""

    def __init__(self, engine: Engine, registry: AdapterRegistry, *, base_fingerprint: str,
                 personas: Sequence[str], max_resident: int, on_event: EventHook | None = None) -> None:
        if max_resident < 1:
            raise ConfigError(f"{max_resident} must be at least 1", field="max_resident_adapters")
        self.engine = engine
        self.registry = registry
        self.base_fingerprint = base_fingerprint
        self.personas = tuple(personas)
        self.max_resident = max_resident
        self._on_event = on_event
        self._versions: dict[str, list[int]] = {p: [] for p in self.personas}
        self._latest: dict[str, int | None] = {p: None for p in self.personas}
        self._persona_errors: dict[str, str] = {}
        self._resident: collections.OrderedDict[str, tuple[str, int]] = collections.OrderedDict()
        self._inflight: collections.Counter[str] = collections.Counter()
        self._disabled: set[tuple[str, int]] = set()
        self._refused: dict[tuple[str, int], _Refusal] = {}
        self._remove_when_idle: set[str] = set()
        self._lock = asyncio.Lock()
        self._folder_stamp: tuple[Any, ...] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- what serves ------------------------------------------------------------------------------------
    def live(self, persona: str) -> int | None:
        """The version that answers ``persona`` now, or None for prompt-only."""
        latest = self._latest.get(persona)
        if latest is None:
            return None
        for version in sorted((v for v in self._versions.get(persona, []) if v <= latest), reverse=True):
            if self._usable(persona, version):
                return version
        return None

    def _usable(self, persona: str, version: int) -> bool:
        return (persona, version) not in self._disabled and (persona, version) not in self._refused

    def _pinned(self, name: str) -> bool:
        persona, version = self._resident[name]
        return self.live(persona) == version

    async def acquire(self, persona: str, version: int | None = None) -> Lease | None:
        """Hold the adapter for one request: ``version`` or else the live one (None when prompt-only).

        Without an explicit version a refused live version is skipped for the next usable one.
        """
        while True:
            wanted = version if version is not None else self.live(persona)
            if wanted is None:
                return None
            name = engine_name(persona, wanted)
            if version is not None:
                self._check_named(persona, version)
            try:
                if name not in self._resident:
                    async with self._lock:
                        if name not in self._resident:
                            await self._load(persona, wanted)
            except AdapterError:
                if version is not None:
                    raise
                continue  # the refusal is recorded, so live() now names an older version or None
            self._inflight[name] += 1
            self._resident.move_to_end(name)
            return Lease(persona, wanted, name)

    def _check_named(self, persona: str, version: int) -> None:
        """A version asked for by number must be servable now, also while it is still resident: a disabled,
        quarantined or deleted version only waits there for its last request, and must take no new ones."""
        name = engine_name(persona, version)
        if name not in self._resident or version not in self._versions.get(persona, []):
            self._check_exists(persona, version)  # never published or gone from disk: a 404, not a 422
        self._refuse_disabled(persona, version)
        refusal = self._refused.get((persona, version))
        if refusal is not None and name in self._resident:
            raise _rebuild_error(refusal)  # quarantined: the engine drops it once the lock is free

    def _refuse_disabled(self, persona: str, version: int) -> None:
        if (persona, version) in self._disabled:
            raise AdapterError(f"{engine_name(persona, version)} is disabled; POST it to enable it again")

    def release(self, lease: Lease) -> None:
        self._inflight[lease.name] -= 1
        if self._inflight[lease.name] <= 0:
            del self._inflight[lease.name]
            if lease.name in self._remove_when_idle:
                self._spawn(self._remove_idle(lease.name))

    # -- loading ----------------------------------------------------------------------------------------
    async def _load(self, persona: str, version: int, *, evict_live: bool = True) -> None:
        """Validate and load one version; the caller holds the lock. Refusals are recorded and raised;
        a full residency raises QueueFullError and records nothing."""
        self._refuse_disabled(persona, version)
        refusal = self._refused.get((persona, version))
        if refusal is not None:
            stamp = await asyncio.to_thread(self._file_stamp, persona, version)
            if stamp == refusal.stamp:
                raise _rebuild_error(refusal)
            del self._refused[(persona, version)]
        name = engine_name(persona, version)
        folder = self.registry.path(persona, version)
        # Stamped before the checks read the files: files fixed while a check fails change the stamp, so
        # the next attempt retries instead of repeating the refusal.
        stamp = await asyncio.to_thread(self._file_stamp, persona, version)
        try:
            await asyncio.to_thread(self._validate, persona, version)
            await self._make_room(evict_live=evict_live)
            await asyncio.to_thread(self._engine_add, name, folder)
        except AdapterError as exc:
            kind = "incompatible" if isinstance(exc, AdapterIncompatibleError) else "broken"
            self._refused[(persona, version)] = _Refusal(stamp, public_message(exc), kind)
            log.warning("refused adapter %s: %s", name, exc)
            self._event("refused", persona, version)
            raise
        self._resident[name] = (persona, version)
        self._remove_when_idle.discard(name)
        self._event("loaded", persona, version)

    def _engine_add(self, name: str, folder: Path) -> None:
        try:
            self.engine.add_adapter(name, folder)
        except (AdapterError, QueueFullError):  # QueueFullError: no free engine slot now, nothing wrong with it
            raise
        except Exception as exc:  # any engine failure refuses this adapter, not the server
            raise AdapterError(f"the engine could not load it ({type(exc).__name__}: {exc})", path=folder) from exc

    async def _make_room(self, *, evict_live: bool) -> None:
        """Free a slot: the least recently used idle non-live adapter first, then (on demand only) an idle
        live one, which simply reloads when next asked for. Raises QueueFullError when every slot is busy."""
        while len(self._resident) >= self.max_resident:
            idle = [n for n in self._resident if not self._inflight.get(n)]
            victim = next((n for n in idle if not self._pinned(n)), None)
            if victim is None and evict_live and idle:
                victim = idle[0]
            if victim is None:
                raise QueueFullError(f"all {self.max_resident} resident adapter slots are "
                                     f"{'serving requests' if evict_live else 'live'}; retry shortly "
                                     "or raise --max-resident-adapters")
            await self._unload(victim)

    async def _unload(self, name: str) -> None:
        persona, version = self._resident.pop(name)
        self._remove_when_idle.discard(name)
        await asyncio.to_thread(self.engine.remove_adapter, name)
        self._event("unloaded", persona, version)

    async def _remove_idle(self, name: str) -> None:
        async with self._lock:
            if name in self._resident and not self._inflight.get(name) and name in self._remove_when_idle:
                await self._unload(name)

    # -- reloading from disk ----------------------------------------------------------------------------
    async def reload(self) -> dict[str, Any]:
        """Re-read the registry, load every persona's live version, retire what is gone or disabled."""
        async with self._lock:
            # Stamp before scanning: a publish landing mid-scan then changes the stamp and the watcher
            # reloads again, where a stamp taken after the scan would hide it for good.
            self._folder_stamp = await asyncio.to_thread(self.folder_stamp)
            scanned = await asyncio.to_thread(self._scan)
            for persona, (versions, latest, disabled, error) in scanned.items():
                self._versions[persona] = versions
                if error is None:
                    self._latest[persona] = latest
                    self._adopt_disabled(persona, disabled)
                    self._persona_errors.pop(persona, None)
                else:
                    self._persona_errors[persona] = error  # keep serving what it served
            for persona in self.personas:
                await self._load_live(persona)
            await self._retire()
        return self.report()

    def _adopt_disabled(self, persona: str, recorded: set[int]) -> None:
        self._disabled = {key for key in self._disabled if key[0] != persona}
        self._disabled.update((persona, v) for v in recorded)

    async def _load_live(self, persona: str) -> None:
        while (version := self.live(persona)) is not None:
            if engine_name(persona, version) in self._resident:
                return
            try:
                await self._load(persona, version, evict_live=False)
                return
            except AdapterError:
                continue  # recorded as refused; try the next older version
            except QueueFullError:
                log.info("no free adapter slot for %s; it loads on first use", engine_name(persona, version))
                return

    async def _retire(self) -> None:
        """Unload versions that vanished from disk or were disabled (after their requests finish)."""
        for name, (persona, version) in list(self._resident.items()):
            gone = version not in self._versions.get(persona, []) or (persona, version) in self._disabled
            if not gone:  # back before its last request ended: that request's release must not unload it
                self._remove_when_idle.discard(name)
                continue
            if self._inflight.get(name):
                self._remove_when_idle.add(name)
            else:
                await self._unload(name)

    async def watch(self, interval_s: float) -> None:
        """Reload whenever the folder summary changes; runs until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                stamp = await asyncio.to_thread(self.folder_stamp)
                if stamp != self._folder_stamp:
                    log.info("adapters folder changed; reloading")
                    await self.reload()
            except (OSError, PersonaRouterError) as exc:
                log.warning("watching the adapters folder failed: %s", exc)

    async def set_personas(self, personas: Sequence[str]) -> dict[str, Any]:
        """The pack changed: serve these personas from now on. New ones are scanned and their live adapter
        loaded; the adapters of removed ones are unloaded once their last request finishes."""
        async with self._lock:
            self.personas = tuple(personas)
            for persona in self.personas:
                self._versions.setdefault(persona, [])
                self._latest.setdefault(persona, None)
            for persona in [p for p in self._versions if p not in self.personas]:
                del self._versions[persona]
                self._latest.pop(persona, None)
                self._persona_errors.pop(persona, None)
            self._disabled = {key for key in self._disabled if key[0] in self.personas}
            self._refused = {key: value for key, value in self._refused.items() if key[0] in self.personas}
            await self._retire()  # a removed persona has no versions left: its adapters retire
        return await self.reload()

    # -- admin ------------------------------------------------------------------------------------------
    async def load(self, persona: str, version: int) -> dict[str, Any]:
        """Admin: enable a version and make it resident (forgetting an earlier refusal to retry it)."""
        await asyncio.to_thread(self._check_exists, persona, version)
        async with self._lock:
            self._disabled.discard((persona, version))
            self._adopt_disabled(persona, await asyncio.to_thread(self._save_disabled, persona, enable=(version,)))
            self._refused.pop((persona, version), None)
            if version not in self._versions[persona]:
                self._versions[persona] = sorted([*self._versions[persona], version])
            if engine_name(persona, version) not in self._resident:
                await self._load(persona, version)
            self._remove_when_idle.discard(engine_name(persona, version))  # enabled again before it went idle
            self._resident.move_to_end(engine_name(persona, version))
        return self.describe_persona(persona)

    async def unload(self, persona: str, version: int) -> dict[str, Any]:
        """Admin: disable a version and unload it once idle; the persona falls back to an older version."""
        if persona not in self.personas:
            raise UnknownPersonaError(persona, self.personas)
        name = engine_name(persona, version)
        if name not in self._resident and version not in self._versions.get(persona, []):
            await asyncio.to_thread(self._check_exists, persona, version)
        async with self._lock:
            self._disabled.add((persona, version))
            self._adopt_disabled(persona, await asyncio.to_thread(self._save_disabled, persona, disable=(version,)))
            await self._retire()
            await self._load_live(persona)
        return self.describe_persona(persona)

    # -- the engine's watchdog --------------------------------------------------------------------------
    def quarantine(self, name: str, reason: str) -> None:
        """The engine took ``name`` out of service (non-finite values); call on the event loop.

        Recorded at once, so the very next request of the persona goes to its next usable version; the
        unload and that version's load follow under the lock."""
        found = self._resident.get(name)
        if found is None:
            return
        persona, version = found
        stamp = self._file_stamp(persona, version)  # a few stat calls
        self._refused[(persona, version)] = _Refusal(stamp, f"quarantined by the engine: {reason}; fix or replace "
                                                     "its files, or POST it to retry", "quarantined")
        log.error("adapter %s quarantined (%s); %s falls back to its next usable version", name, reason, persona)
        self._spawn(self._quarantine(name))

    async def _quarantine(self, name: str) -> None:
        async with self._lock:
            found = self._resident.pop(name, None)
            if found is None:
                return
            persona, version = found
            self._remove_when_idle.discard(name)
            try:
                await asyncio.to_thread(self.engine.remove_adapter, name)
            except AdapterError as exc:
                log.warning("removing quarantined adapter %s: %s", name, exc)
            self._event("quarantined", persona, version)
            await self._load_live(persona)

    # -- reporting --------------------------------------------------------------------------------------
    def _event(self, event: str, persona: str, version: int) -> None:
        if self._on_event is not None:
            self._on_event(event, persona, version)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def resident(self) -> list[AdapterKey]:
        """The resident adapters, least recently used first (read from the record, never by splitting names)."""
        return [AdapterKey(persona, version) for persona, version in self._resident.values()]

    def describe_persona(self, persona: str) -> dict[str, Any]:
        live = self.live(persona)
        versions = []
        for version in self._versions.get(persona, []):
            name = engine_name(persona, version)
            entry: dict[str, Any] = {"version": version, "state": self._state(persona, version),
                                     "live": version == live, "in_flight": self._inflight.get(name, 0)}
            refusal = self._refused.get((persona, version))
            if refusal is not None:
                entry["error"] = refusal.error
            versions.append(entry)
        described: dict[str, Any] = {"name": persona, "status": "adapter" if live is not None else "prompt-only",
                                     "live_version": live, "latest": self._latest.get(persona),
                                     "versions": versions}
        if persona in self._persona_errors:
            described["error"] = self._persona_errors[persona]
        return described

    def _state(self, persona: str, version: int) -> str:
        if (persona, version) in self._disabled:
            return "disabled"
        refusal = self._refused.get((persona, version))
        if refusal is not None:
            return refusal.kind
        return "resident" if engine_name(persona, version) in self._resident else "available"

    def report(self) -> dict[str, Any]:
        return {
            "live": {p: self.live(p) for p in self.personas},
            "resident": [str(key) for key in self.resident()],
            "refused": [{"persona": p, "version": v, "error": r.error, "kind": r.kind}
                        for (p, v), r in sorted(self._refused.items())],
            "disabled": [{"persona": p, "version": v} for p, v in sorted(self._disabled)],
        }

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
