"""The small value types and helpers of the adapter residency (``adapters/residency.py``), apart so that the
residency module holds only its policy: the engine name of a version, the lease a request holds, the record of
a refusal and the not-found error. ``persona_router.adapters.residency`` re-exports the public ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from persona_router.core.errors import AdapterError, AdapterIncompatibleError
from persona_router.core.names import AdapterKey

EventHook = Callable[[str, str, int], None]  # (event, persona, version)
Stamp = tuple[tuple[str, int, int], ...]


def engine_name(persona: str, version: int) -> str:
    """The name a version is registered under in the engine: ``str(AdapterKey)``, ``persona@version``."""
    return str(AdapterKey(persona, version))


class AdapterNotFoundError(AdapterError):
    """A persona/version pair that the adapters folder does not hold."""


@dataclass(frozen=True)
class Lease:
    """An adapter held by one request; ``release`` it when the request ends."""

    persona: str
    version: int
    name: str  # the engine's name for it, ``str(self.key)``

    @property
    def key(self) -> AdapterKey:
        return AdapterKey(self.persona, self.version)


@dataclass(frozen=True)
class _Refusal:
    stamp: Stamp
    error: str
    kind: str  # "incompatible", "broken" or "quarantined"


def _rebuild_error(refusal: _Refusal) -> AdapterError:
    if refusal.kind == "incompatible":
        return AdapterIncompatibleError(refusal.error)
    return AdapterError(refusal.error)
