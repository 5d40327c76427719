"""The parts of a pool of generation upstreams (``adapters/upstream_pool.py``): what a member must offer,
the pool's configuration, what the pool tracks per member, and the affinity ranking."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from persona_router.adapters.engine_api import EngineStats, GenerationHandle, GenerationRequest
from persona_router.core.errors import ConfigError


class PoolMember(Protocol):
    """One upstream: the ``Engine`` methods plus a name and a health probe."""

    name: str

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def stop(self) -> None: ...

    def submit(self, request: GenerationRequest) -> GenerationHandle: ...

    def add_adapter(self, name: str, folder: Path) -> None: ...

    def remove_adapter(self, name: str) -> None: ...

    def stats(self) -> EngineStats: ...

    async def probe(self) -> list[str] | None:
        """The adapter names the member holds now, or None when it cannot serve."""
        ...


@dataclass(frozen=True)
class PoolConfig:
    """``max_in_flight``: requests per member before the next one spills over; ``replicas``: members an adapter
    is loaded on eagerly; ``max_queue``: requests beyond the pool's total capacity before 429."""

    max_in_flight: int = 8
    replicas: int = 1
    max_queue: int = 64
    health_interval_s: float = 2.0

    def __post_init__(self) -> None:
        for name, lower in (("max_in_flight", 1), ("replicas", 1), ("max_queue", 0)):
            if getattr(self, name) < lower:
                raise ConfigError(f"{getattr(self, name)} must be at least {lower}", field=name)
        if not 0.05 <= self.health_interval_s <= 3600:
            raise ConfigError(f"{self.health_interval_s} must be between 0.05 and 3600 s", field="health_interval_s")


@dataclass
class MemberState:
    """What the pool knows about one member; the counters feed the per-upstream metrics."""

    member: PoolMember
    up: bool = False  # until its first probe answers
    in_flight: int = 0
    held: set[str] = field(default_factory=set)
    requests: int = 0
    failures: int = 0
    retries: int = 0
    adapter_loads: int = 0
    last_error: str | None = "not probed yet"
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    check_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.member.name


class Placement(Protocol):
    """What a request's handle needs from its pool (``UpstreamPool`` implements it)."""

    def choose(self, adapter: str | None, *, exclude: Sequence[str] = ()) -> MemberState: ...

    async def ensure_adapter(self, state: MemberState, name: str) -> None: ...

    async def check(self, state: MemberState) -> bool: ...

    def mark_down(self, state: MemberState, reason: str) -> None: ...

    def release(self, state: MemberState, *, retried: bool) -> None: ...

    def forget(self, state: MemberState, adapter: str) -> None: ...


def rendezvous_order(key: str, names: Sequence[str]) -> list[str]:
    """Members ranked for ``key``, highest random weight first (stable for a given key and member set)."""
    def weight(name: str) -> bytes:
        return hashlib.sha256(f"{key}|{name}".encode()).digest()

    return sorted(names, key=weight, reverse=True)
