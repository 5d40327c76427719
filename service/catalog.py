"""The persona pack and the router the service answers with, swapped as one immutable object.

A ``Catalog`` is the pack plus the routing function fitted for exactly that pack. Requests read
``CatalogHolder.current`` once and use that snapshot to the end, so a request never sees a new pack with
an old router (or half of a router). ``CatalogReloader`` builds the next catalog off the event loop when the
pack file or the router folder changes (or on the admin reload), tells the adapter residency which personas
exist, and then swaps in the one place that swaps: ``CatalogHolder.swap``. A pack that fails validation or a
router that cannot be loaded or fitted leaves the current catalog serving, and the error is reported.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_router.adapters.residency import AdapterResidency
from persona_router.core.atomic import file_stamp
from persona_router.core.errors import InvalidRequestError, PersonaRouterError
from persona_router.core.pack import PersonaPack, load_pack, resolve_pack_path
from persona_router.router.decision import Decision
from persona_router.router.onnx_encoder import DEFAULT_BACKEND

log = logging.getLogger(__name__)

Decide = Callable[[str, str | None], Decision]
Stamp = tuple[Any, ...]


@dataclass(frozen=True)
class Catalog:
    """One pack and the routing fitted for it; never mutated (a reload builds a new one)."""

    pack: PersonaPack
    decide: Decide
    router_info: dict[str, Any]
    stamp: Stamp = ()
    generation: int = 1
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        return {"pack": self.pack.name, "source": self.pack.source, "personas": list(self.pack.names),
                "router": self.router_info.get("mode"), "generation": self.generation}


class CatalogHolder:
    """The live catalog. ``swap`` is the only way to change it: one reference assignment."""

    def __init__(self, catalog: Catalog) -> None:
        self._current = catalog

    @property
    def current(self) -> Catalog:
        return self._current

    def swap(self, catalog: Catalog) -> Catalog:
        old, self._current = self._current, catalog
        return old


def fallback_decider(pack: PersonaPack) -> Decide:
    """Routing without a classifier (``--router fallback``): a named persona, else the fallback, saying so."""
    from persona_router.router.decision import explicit

    def decide(question: str, persona: str | None = None) -> Decision:
        if not isinstance(question, str) or not question.strip():
            raise InvalidRequestError("must not be empty or only whitespace", field="question")
        if persona is not None:
            return explicit(pack.get(persona).name)
        return Decision(persona=pack.fallback.name, source="fallback", confidence=0.0,
                        reason="the service runs without a persona classifier (--router fallback)")

    return decide


class CatalogBuilder:
    """Loads the pack named by the settings and its router (blocking; run in a worker thread).

    The embedding model is loaded once and reused by every later build. A fitted router is read from the
    pack's router folder (``persona-router fit-router`` writes it atomically); when it is missing or was
    fitted for another version of the pack, it is fitted here and saved there, as at start-up.
    """

    def __init__(self, pack_ref: str, router_mode: str, router_backend: str = DEFAULT_BACKEND) -> None:
        self.pack_ref = pack_ref
        self.router_mode = router_mode
        self.router_backend = router_backend
        self._encoder: Any = None

    def stamp(self, pack_name: str | None) -> Stamp:
        """Cheap summary of what a build reads: the pack file and the router's description file."""
        pack = _file_stamp(resolve_pack_path(self.pack_ref))
        if self.router_mode == "fitted" and pack_name is not None:
            return pack, self._router_stamp(pack_name)
        return (pack,)

    @staticmethod
    def _router_stamp(pack_name: str) -> Any:
        from persona_router.router.persona_router import ROUTER_FILE, default_router_dir

        return _file_stamp(default_router_dir(pack_name) / ROUTER_FILE)

    def build(self, generation: int = 1) -> Catalog:
        # The pack file is stamped before it is read, so an edit landing during the build shows as a change.
        pack_stamp = _file_stamp(resolve_pack_path(self.pack_ref))
        pack = load_pack(self.pack_ref)
        stamp: Stamp = (pack_stamp,)
        if self.router_mode == "fallback":
            decide = fallback_decider(pack)
            info: dict[str, Any] = {"mode": "fallback", "fallback": pack.fallback.name}
        else:
            from persona_router.router.fitting import ensure_router
            from persona_router.router.onnx_encoder import build_encoder

            if self._encoder is None:
                # The default embedder on the configured backend (the ONNX export is built once and cached).
                self._encoder = build_encoder(None, self.router_backend)
            router = ensure_router(pack, encoder=self._encoder)
            # The router file is stamped once the router is read (a fit here wrote it), before the warm-up,
            # so that a save landing from then on shows as a change.
            stamp = (pack_stamp, self._router_stamp(pack.name))
            router.decide("warm up the encoder")  # the first encode pays one-off costs
            decide, info = router.decide, {"mode": "fitted", **router.describe()}
        return Catalog(pack=pack, decide=decide, router_info=info, stamp=stamp, generation=generation)


class CatalogReloader:
    """Rebuilds and swaps the catalog when its files change; one reload at a time."""

    def __init__(self, holder: CatalogHolder, builder: CatalogBuilder, residency: AdapterResidency,
                 on_swap: Callable[[Catalog, Catalog], None] | None = None) -> None:
        self.holder = holder
        self.builder = builder
        self.residency = residency
        self._on_swap = on_swap
        self._lock = asyncio.Lock()
        self.last_error: str | None = None
        self._failed_stamp: Stamp | None = None

    async def reload(self, *, force: bool = False) -> dict[str, Any]:
        """Rebuild when the pack file or router changed (always with ``force``); returns what serves now."""
        async with self._lock:
            current = self.holder.current
            stamp = await asyncio.to_thread(self.builder.stamp, current.pack.name)
            # A build that failed is retried when the files change again (or on demand), not every tick.
            changed = force or (stamp != current.stamp and stamp != self._failed_stamp)
            if changed:
                try:
                    new = await asyncio.to_thread(self.builder.build, current.generation + 1)
                except (PersonaRouterError, OSError, ValueError) as exc:
                    # Keep serving the catalog that works; the admin reload reports the error.
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self._failed_stamp = stamp
                    log.warning("pack reload failed, still serving %s generation %d: %s", current.pack.name,
                                current.generation, exc)
                    return {**current.describe(), "changed": False, "error": self.last_error}
                self.last_error = self._failed_stamp = None
                # New personas must be known to the residency before a request can route to them, and removed
                # ones kept until none can: the old catalog routes to them (with their adapters) until the swap.
                leaving = tuple(name for name in current.pack.names if name not in new.pack.names)
                await self.residency.set_personas((*new.pack.names, *leaving))
                self.holder.swap(new)
                if leaving:
                    await self.residency.set_personas(new.pack.names)  # their adapters retire once idle
                if self._on_swap is not None:
                    self._on_swap(current, new)
                added = sorted(set(new.pack.names) - set(current.pack.names))
                removed = sorted(set(current.pack.names) - set(new.pack.names))
                log.info("pack %s reloaded (generation %d): added %s, removed %s", new.pack.name, new.generation,
                         added or "none", removed or "none")
                # "changed": the files differ from what served (a forced reload of the same files rebuilds,
                # and says so with "reloaded", but changes nothing).
                return {**new.describe(), "changed": stamp != current.stamp, "reloaded": True, "added": added,
                        "removed": removed}
            return {**self.holder.current.describe(), "changed": False}

    async def watch(self, interval_s: float) -> None:
        """Reload whenever the pack file or the router folder changes; runs until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reload()
            except (OSError, PersonaRouterError) as exc:
                log.warning("watching the pack failed: %s", exc)


def _file_stamp(path: Path) -> tuple[str, int, int, int] | None:
    stamp = file_stamp(path)  # with the path: a renamed pack reads another router folder
    return None if stamp is None else (str(path), *stamp)
