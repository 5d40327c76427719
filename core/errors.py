"""Every domain error of persona-router, in one place.

Library code raises these; the CLI prints their message and exits non-zero, and the HTTP service maps each
class to one status code (``service/http_errors.py``). They live in ``core/``, the bottom layer that every
other package may import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path


class PersonaRouterError(Exception):
    """Base class: a message a user can act on, optionally naming the file and field at fault."""

    def __init__(self, message: str, *, path: str | Path | None = None, field: str | None = None) -> None:
        self.message = message  # without the path and field prefix
        self.path = str(path) if path is not None else None
        self.field = field
        self.detail = message  # without the location prefix
        where = []
        if self.path:
            where.append(self.path)
        if field:
            where.append(f"field {field!r}")
        prefix = f"{': '.join(where)}: " if where else ""
        super().__init__(f"{prefix}{message}")


class ConfigError(PersonaRouterError):
    """An invalid configuration value (names the field and the valid choices)."""


class PackError(PersonaRouterError):
    """A persona pack file that does not validate."""


class DataError(PersonaRouterError):
    """A dataset row or file that does not validate."""


class BaseModelError(PersonaRouterError):
    """A base model that cannot be found or loaded."""


class CacheError(PersonaRouterError):
    """The offline model cache cannot be built."""


class AdapterError(PersonaRouterError):
    """An adapter folder that is missing, corrupt or unusable."""


class AdapterIncompatibleError(AdapterError):
    """An adapter trained on another base model (fingerprint mismatch)."""


class TrainingDivergedError(AdapterError):
    """A training run whose loss or adapter weights are not finite: it is never published."""


class UnknownPersonaError(PersonaRouterError):
    """A persona name that the pack does not define."""

    def __init__(self, name: str, valid: Iterable[str]) -> None:
        self.name = name
        self.valid = sorted(valid)
        super().__init__(f"unknown persona {name!r}; valid personas: {', '.join(self.valid)}", field="persona")


class RouterModelError(PersonaRouterError):
    """A fitted router that is missing, corrupt or was fitted with another embedder."""


class StaleRouterError(RouterModelError):
    """A fitted router that no longer matches its pack or embedder. ``reason`` is why, without the advice that
    follows it in the message: a caller that refits, or that knows the router's own refit command, says its own."""

    def __init__(self, reason: str, advice: str, *, path: str | Path | None = None) -> None:
        self.reason = reason
        super().__init__(f"{reason}; {advice}", path=path)


class InvalidRequestError(PersonaRouterError):
    """A request that fails validation (empty question, out-of-range parameter)."""


class QueueFullError(PersonaRouterError):
    """The generation queue is full; the client should retry later."""

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class UpstreamUnavailableError(PersonaRouterError):
    """No generation upstream (a vLLM server or an engine of a pool) can take the request now."""

    def __init__(self, message: str, *, retry_after_s: int = 2) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class UpstreamFailedError(PersonaRouterError):
    """One upstream failed a request (unreachable, 5xx, broken stream, adapter lost by a restart).

    Raised by a pool member's stream; the pool retries the request on another member when no token of it
    was delivered yet. ``adapter_missing`` says the upstream no longer holds the request's adapter.
    """

    def __init__(self, message: str, *, adapter_missing: bool = False) -> None:
        self.adapter_missing = adapter_missing
        super().__init__(message)


def choices(valid: Iterable[str]) -> str:
    """Format valid choices for an error message."""
    return ", ".join(repr(v) for v in valid)


# An absolute POSIX path of at least two parts; API routes (/v1/...) and URLs are not file-system paths.
_ABS_PATH = re.compile(r"(?<![\w.~:/-])/(?!v1/)(?:[^\s/'\"`:,;()\[\]{}<>]+/)+[^\s/'\"`:,;()\[\]{}<>]*")
_QUOTED_PATH = re.compile(r"(['\"])(/[^'\"\n]*/[^'\"\n]*)\1")  # quoted, so it may hold spaces


def redact_paths(text: str) -> str:
    """Replace every absolute path in ``text`` by its last part (a file or folder name)."""

    def name(path: str) -> str:
        return next((part for part in reversed(path.split("/")) if part), "/")

    text = _QUOTED_PATH.sub(lambda match: f"{match.group(1)}{name(match.group(2))}{match.group(1)}", text)
    return _ABS_PATH.sub(lambda match: name(match.group(0)), text)


def public_message(exc: BaseException) -> str:
    """``exc``'s message for a client of the HTTP API: the field it names, never a file-system location
    (the server's log has those)."""
    if isinstance(exc, PersonaRouterError):
        text = f"field {exc.field!r}: {exc.detail}" if exc.field else exc.detail
    else:
        text = str(exc)
    return redact_paths(text)
