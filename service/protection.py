"""Who may call the service from where: Host validation, cross-site refusal for admin, JSON-only bodies.

A web page in the user's browser can send requests to a server on the user's machine. Two ways in are
closed here:

- DNS rebinding: a page on ``evil.example`` whose name later resolves to 127.0.0.1 is same-origin with the
  server as far as the browser knows, but its requests carry ``Host: evil.example``. Every request's Host
  must name the bind address (loopback binds: any loopback name) or one of ``--allowed-host``.
- Cross-site requests: a form or ``fetch`` on another site can POST ``text/plain`` without a CORS
  preflight. State-changing admin calls must be ``Content-Type: application/json`` (which forces a
  preflight, and the service answers none) and are refused when the browser says they come from another
  site (``Sec-Fetch-Site``) or another origin (``Origin``). Answer endpoints take JSON bodies only.

Guards raise domain errors; ``service/http_errors.py`` turns them into statuses.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from persona_router.core.errors import InvalidRequestError
from persona_router.service.http_errors import ForbiddenError, UnsupportedMediaTypeError
from persona_router.service.settings import ServiceSettings, is_loopback

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
Guard = Any  # Litestar's guard signature: (connection, handler) -> None


def host_name(header: str) -> str:
    """``Host`` header -> lower-case name without port or IPv6 brackets."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return name.rstrip(".")


def allowed_hosts(settings: ServiceSettings) -> frozenset[str] | None:
    """The Host names this server answers to; None: any (bound to every interface with no allow-list)."""
    configured = {host_name(h) for h in settings.allowed_hosts}
    bind = host_name(settings.host)
    if bind in ("0.0.0.0", "::"):  # every interface: only the allow-list knows the names clients use
        return frozenset(configured) if configured else None
    configured.add(bind)
    if is_loopback(bind):
        configured.update(LOOPBACK_NAMES)
    return frozenset(configured)


def host_guard(settings: ServiceSettings) -> Guard:
    allowed = allowed_hosts(settings)

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        if allowed is None:
            return
        header = connection.headers.get("host", "")
        if host_name(header) not in allowed:
            raise InvalidRequestError(f"Host {header!r} is not served here (DNS rebinding?); this server answers to "
                                      f"{', '.join(sorted(allowed))}; add others with --allowed-host", field="host")

    return guard


def json_body_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """State-changing calls must declare a JSON body: a cross-site form or simple ``fetch`` cannot."""
    if connection.scope.get("method", "GET") in SAFE_METHODS:
        return
    media = connection.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaTypeError(f"send the request with 'Content-Type: application/json' (got "
                                        f"{media or 'none'!r})", field="content-type")


def same_site_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Refuse state-changing calls a browser marks as coming from another site or origin."""
    if connection.scope.get("method", "GET") in SAFE_METHODS:
        return
    site = connection.headers.get("sec-fetch-site")
    if site is not None and site.lower() not in ("same-origin", "none"):
        raise ForbiddenError(f"cross-site admin request refused (Sec-Fetch-Site: {site})", field="origin")
    origin = connection.headers.get("origin")
    if origin is None:
        return
    parts = urlsplit(origin)
    host = connection.headers.get("host", "")
    if origin == "null" or not parts.netloc or parts.netloc.lower() != host.strip().lower():
        raise ForbiddenError(f"cross-origin admin request refused (Origin {origin!r} is not this server)",
                             field="origin")
