"""The one place that maps domain errors (``core/errors.py``) to HTTP statuses and error bodies.

Every error response has the shape ``{"error": {"message", "type", "param", "code", "field"?, "valid"?,
"retry_after_s"?}}`` (``param`` and ``code`` always present, null where they do not apply, as OpenAI sends them).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.exceptions import ValidationException as LitestarValidationException
from persona_router.adapters.residency import AdapterNotFoundError
from persona_router.core.errors import (
    AdapterError,
    AdapterIncompatibleError,
    ConfigError,
    InvalidRequestError,
    PersonaRouterError,
    QueueFullError,
    UnknownPersonaError,
    UpstreamFailedError,
    UpstreamUnavailableError,
    public_message,
)
from persona_router.service.answering import ClientDisconnectedError
from persona_router.service.schemas import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024  # request bodies above this are refused with 413


class NotReadyError(PersonaRouterError):
    """The service is still loading its models."""


class ModelNotFoundError(PersonaRouterError):
    """An OpenAI ``model`` this server does not serve (OpenAI's 404 ``model_not_found``)."""

    def __init__(self, model: str, valid: list[str]) -> None:
        self.valid = valid
        super().__init__(f"the model {model!r} does not exist; models: {', '.join(valid)} (GET /v1/models)",
                         field="model")


class ForbiddenError(PersonaRouterError):
    """A request refused for where it comes from (a cross-site admin call)."""


class UnsupportedMediaTypeError(PersonaRouterError):
    """A request body that is not declared as JSON."""


class BodyTimeoutError(PersonaRouterError):
    """A request body that did not arrive in time (a client trickling it would hold its connection for good)."""


BODY_TIMEOUT_S = 30.0


async def read_body(request: Request[Any, Any, Any]) -> bytes:
    """The request body, within ``BODY_TIMEOUT_S`` (the request's own timeout starts only once it is read)."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            return await request.body()
    except TimeoutError:
        raise BodyTimeoutError(f"the request body did not arrive within {BODY_TIMEOUT_S:g} s") from None


def status_of(exc: BaseException) -> int:
    """The HTTP status for a domain error; the order matters because the classes nest."""
    if isinstance(exc, UnknownPersonaError | AdapterNotFoundError | ModelNotFoundError):
        return 404
    if isinstance(exc, InvalidRequestError | ConfigError):
        return 400
    if isinstance(exc, QueueFullError):
        return 429
    if isinstance(exc, TimeoutError):
        return 504
    if isinstance(exc, AdapterIncompatibleError):
        return 409
    if isinstance(exc, AdapterError):
        return 422
    if isinstance(exc, NotReadyError | UpstreamUnavailableError):
        return 503
    if isinstance(exc, UpstreamFailedError):
        return 502
    if isinstance(exc, ForbiddenError):
        return 403
    if isinstance(exc, ClientDisconnectedError):
        return 499  # nginx's "client closed request": nobody receives it, the metrics count it
    if isinstance(exc, UnsupportedMediaTypeError):
        return 415
    if isinstance(exc, BodyTimeoutError):
        return 408
    return 500


def error_type(exc: BaseException) -> str:
    return {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
            408: "timeout_error", 409: "adapter_conflict_error", 415: "invalid_request_error", 422: "adapter_error",
            429: "rate_limit_error", 502: "upstream_error", 503: "unavailable_error",
            504: "timeout_error"}.get(status_of(exc), "server_error")


def error_body(exc: BaseException) -> ErrorBody:
    """The JSON error for ``exc`` (also used for errors sent inside an event stream); its message names no
    file-system path."""
    field = getattr(exc, "field", None)
    body = ErrorBody(message=public_message(exc) or type(exc).__name__, type=error_type(exc), field=field,
                     param=field, code=None)
    if isinstance(exc, UnknownPersonaError | ModelNotFoundError):
        body.valid = list(exc.valid)
        body.code = "model_not_found" if isinstance(exc, ModelNotFoundError) else "persona_not_found"
    if isinstance(exc, QueueFullError | UpstreamUnavailableError):
        body.retry_after_s = exc.retry_after_s
    if isinstance(exc, QueueFullError):
        body.code = "rate_limit_exceeded"  # OpenAI's code for a 429, which its clients back off on
    if isinstance(exc, TimeoutError) and not str(exc):
        body.message = "the request timed out"
    return body


def error_response(exc: BaseException) -> Response[Any]:
    status = status_of(exc)
    headers = ({"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFullError | UpstreamUnavailableError)
               else {})
    if isinstance(exc, NotReadyError):
        headers["Retry-After"] = "1"
    if status >= 500 and status not in (503, 504):
        log.error("request failed: %s", exc)
    elif isinstance(exc, PersonaRouterError) and exc.path:
        log.info("request refused: %s", exc)  # the location stays in the log
    return Response(ErrorResponse(error=error_body(exc)), status_code=status, headers=headers)


def _count(request: Request[Any, Any, Any], kind: str) -> None:
    state = getattr(request.app.state, "service", None)
    if state is not None:
        endpoint = str(request.scope.get("path_template") or "unrouted")
        state.metrics.errors.inc(endpoint=endpoint, type=kind)


def _domain_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    _count(request, error_type(exc))
    return error_response(exc)


def _http_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Litestar's own errors (no route, wrong method, bad path parameter, auth) in the same shape."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            405: "method_not_allowed", 413: "invalid_request_error"}.get(exc.status_code, "http_error")
    message = exc.detail
    if exc.status_code == 413:
        message = f"the request body is larger than the limit of {MAX_BODY_BYTES} bytes ({MAX_BODY_BYTES // 1024} KiB)"
    field = None
    if isinstance(exc, LitestarValidationException) and isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        if isinstance(first, dict):
            field = first.get("key")
            message = f"{exc.detail}: {first.get('message', '')}".rstrip(": ")
    headers = dict(exc.headers or {})
    if isinstance(exc, NotAuthorizedException):
        headers.setdefault("WWW-Authenticate", "Bearer")
    body = ErrorBody(message=message, type=kind, field=field, param=field, code=None)
    _count(request, kind)
    return Response(ErrorResponse(error=body), status_code=exc.status_code, headers=headers)


def _unexpected_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    _count(request, "server_error")
    body = ErrorBody(message=f"internal error ({type(exc).__name__})", type="server_error", param=None, code=None)
    return Response(ErrorResponse(error=body), status_code=500)


EXCEPTION_HANDLERS: dict[type[Exception] | int, Any] = {
    PersonaRouterError: _domain_handler,
    TimeoutError: _domain_handler,
    HTTPException: _http_handler,
    Exception: _unexpected_handler,
}
