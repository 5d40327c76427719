"""What the app loads once at start-up and every request shares (``app.state.service``)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from litestar import Request
from persona_router.adapters.base_model import LoadedBase
from persona_router.adapters.engine_api import Engine
from persona_router.adapters.residency import AdapterResidency
from persona_router.core.pack import PersonaPack
from persona_router.service.answering import Answerer
from persona_router.service.catalog import CatalogHolder, CatalogReloader
from persona_router.service.http_errors import NotReadyError
from persona_router.service.metrics import ServiceMetrics
from persona_router.service.settings import ServiceSettings


@dataclass
class ServiceState:
    settings: ServiceSettings
    catalog: CatalogHolder
    reloader: CatalogReloader
    base: LoadedBase
    engine: Engine
    engine_kind: str
    residency: AdapterResidency
    answerer: Answerer
    metrics: ServiceMetrics
    started_at: float = field(default_factory=time.time)
    ready: bool = False
    warmup_error: str | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def pack(self) -> PersonaPack:
        """The pack serving now (it can change while the service runs: read it once per use)."""
        return self.catalog.current.pack

    @property
    def router_info(self) -> dict[str, Any]:
        return self.catalog.current.router_info


def service(request: Request[Any, Any, Any]) -> ServiceState:
    """The loaded service; raises NotReadyError (503) while the lifespan has not finished loading."""
    state: ServiceState | None = getattr(request.app.state, "service", None)
    if state is None:
        raise NotReadyError("the service is still loading its models; retry shortly")
    return state
