"""Arm specifications for ``persona-router eval``: what answers the questions in one arm of a comparison.

Valid forms:

- ``base``: the base model alone, no adapter and no persona system prompt;
- ``prompt``: the base model with the persona's system prompt (the service's prompt-only mode);
- ``NAME@VERSION``: a trained adapter from the registry, e.g. ``clinician@3`` or ``clinician@latest``;
- a path to an adapter folder (``adapter_config.json`` inside), e.g. ``./adapters/clinician/3``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from persona_router.adapters.peft_folder import check_adapter_folder
from persona_router.core.errors import AdapterError, ConfigError
from persona_router.core.names import PERSONA_NAME

BASELINES = ("base", "prompt")
KINDS = ("base", "prompt", "adapter")
LATEST = "latest"
VALID_FORMS = (
    "'base' (base model, no persona prompt), 'prompt' (base model + the persona's system prompt), "
    "'NAME@VERSION' (e.g. 'clinician@3' or 'clinician@latest'), or a path to an adapter folder"
)
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ArmSpec:
    """One parsed arm. ``persona``/``version`` are set for registry adapters, ``path`` for folder adapters."""

    raw: str
    kind: str
    persona: str | None = None
    version: str | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"{self.kind!r} is not one of {', '.join(KINDS)}", field="kind")
        if self.kind == "adapter" and self.path is None and (self.persona is None or self.version is None):
            raise ConfigError("an adapter arm needs a path or both persona and version", field="spec")

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"

    @property
    def label(self) -> str:
        if self.kind != "adapter":
            return self.kind
        if self.path is not None:
            return str(self.path)
        return f"{self.persona}@{self.version}"


def parse_spec(text: str, *, field: str = "spec") -> ArmSpec:
    """Parse one SPEC; errors name the offending text and every valid form."""
    raw = (text or "").strip()
    if not raw:
        raise ConfigError(f"is empty; valid forms: {VALID_FORMS}", field=field)
    if raw in BASELINES:
        return ArmSpec(raw=raw, kind=raw)
    if _looks_like_path(raw):
        return _path_spec(raw, field=field)
    if "@" in raw:
        name, _, version = raw.partition("@")
        if not PERSONA_NAME.match(name):
            raise ConfigError(f"{raw!r}: {name!r} is not a persona name (lowercase letters, digits, '-'); "
                              f"valid forms: {VALID_FORMS}", field=field)
        if not _VERSION.match(version):
            raise ConfigError(f"{raw!r}: {version!r} is not a version (e.g. '3' or 'latest'); "
                              f"valid forms: {VALID_FORMS}", field=field)
        return ArmSpec(raw=raw, kind="adapter", persona=name, version=version)
    raise ConfigError(f"{raw!r} is not a valid arm; valid forms: {VALID_FORMS}", field=field)


def _looks_like_path(raw: str) -> bool:
    return raw.startswith((".", "/", "~")) or "/" in raw or "\\" in raw or Path(raw).expanduser().is_dir()


def _path_spec(raw: str, *, field: str) -> ArmSpec:
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{raw!r}: no such adapter folder; valid forms: {VALID_FORMS}", field=field)
    try:
        check_adapter_folder(path)
    except AdapterError as exc:
        raise ConfigError(f"{raw!r}: {exc}; valid forms: {VALID_FORMS}", field=field) from exc
    return ArmSpec(raw=raw, kind="adapter", path=path.resolve())
