"""Admin endpoints: reload the pack and router, reload the adapters folder, load or unload one adapter version.

When ``PERSONA_ROUTER_ADMIN_TOKEN`` is set every admin call needs ``Authorization: Bearer <token>``.
Every call changes state, so each must be ``Content-Type: application/json`` and must not come from
another site (``service/protection.py``). Persona and version arrive as path segments and are checked
against the registry's name rules (versions: ASCII digits only) before any path is built, so ``..``,
slashes, absolute paths or look-alike digits never reach the file system.
"""

from __future__ import annotations

import hmac
import logging
import re
from typing import Any

from litestar import Request, Router, delete, post
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from persona_router.core.errors import ConfigError, InvalidRequestError
from persona_router.core.names import check_persona_name, check_version
from persona_router.service.protection import json_body_guard, same_site_guard
from persona_router.service.settings import ServiceSettings, is_loopback
from persona_router.service.state import service

log = logging.getLogger(__name__)
_VERSION = re.compile(r"[1-9][0-9]{0,8}")  # ASCII only: str.isdigit() also accepts '²' and Arabic-Indic digits


def _parse_target(persona: str, version: str) -> tuple[str, int]:
    try:
        check_persona_name(persona)
    except ConfigError as exc:
        raise InvalidRequestError(str(exc).split(": ", 1)[-1], field="persona") from exc
    if not _VERSION.fullmatch(version):
        raise InvalidRequestError(f"{version!r} is not a version (an integer from 1 to 999999999 in ASCII "
                                  "digits)", field="version")
    try:
        return persona, check_version(int(version))
    except ConfigError as exc:
        raise InvalidRequestError(str(exc).split(": ", 1)[-1], field="version") from exc


def bearer_guard(token: str | None) -> Any:
    """A Litestar guard that compares the bearer token in constant time; no token configured: open."""

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        if token is None:
            return
        header = connection.headers.get("authorization", "")
        scheme, _sep, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise NotAuthorizedException("admin endpoints need 'Authorization: Bearer <PERSONA_ROUTER_ADMIN_TOKEN>'")

    return guard


@post("/reload", status_code=200)
async def reload_all(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Re-read the pack and its router now (a pack that fails validation leaves the old one serving and is
    reported in ``pack.error``), then the adapters folder."""
    state = service(request)
    pack = await state.reloader.reload(force=True)
    return {"pack": pack, "adapters": await state.residency.reload()}


@post("/adapters/reload", status_code=200)
async def reload_adapters(request: Request[Any, Any, Any]) -> dict[str, Any]:
    return await service(request).residency.reload()


@post("/adapters/{persona:str}/{version:str}", status_code=200)
async def load_adapter(request: Request[Any, Any, Any], persona: str, version: str) -> dict[str, Any]:
    name, number = _parse_target(persona, version)
    return await service(request).residency.load(name, number)


@delete("/adapters/{persona:str}/{version:str}", status_code=200)
async def unload_adapter(request: Request[Any, Any, Any], persona: str, version: str) -> dict[str, Any]:
    name, number = _parse_target(persona, version)
    return await service(request).residency.unload(name, number)


def admin_router(settings: ServiceSettings) -> Router:
    if settings.admin_token is None and not is_loopback(settings.host):  # only with --allow-open-admin
        log.warning("admin endpoints are open on %s: set PERSONA_ROUTER_ADMIN_TOKEN to protect them", settings.host)
    return Router(path="/v1/admin", route_handlers=[reload_all, reload_adapters, load_adapter, unload_adapter],
                  guards=[bearer_guard(settings.admin_token), same_site_guard, json_body_guard])
