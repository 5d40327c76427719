"""Persona and version names (the one rule that packs, the registry, eval specs and the service share) and
the typed adapter key."""

from __future__ import annotations

import re
from dataclasses import dataclass

from persona_router.core.errors import ConfigError

# The one persona-name rule: packs validate with it, and it keeps registry paths inside the adapters folder.
PERSONA_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}\Z")  # \Z, not $: "$" also matches before a final newline
SEPARATOR = "@"
# ``persona:auto`` is the OpenAI model id that asks the router to infer the persona: no persona or alias may
# take the name, or it could never be chosen there.
AUTO = "auto"
_VERSION = re.compile(r"^[1-9][0-9]*\Z")


def check_persona_name(persona: str) -> str:
    """Reject names that could leave the registry folder (``..``, ``/``, absolute paths) or are not persona names."""
    if not isinstance(persona, str) or not PERSONA_NAME.match(persona):
        raise ConfigError(f"{persona!r} is not a persona name (lowercase letters, digits and '-', starting with a "
                          "letter, max 40)", field="persona")
    return persona


def check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"{version!r} is not a version (an integer >= 1)", field="version")
    return version


@dataclass(frozen=True, order=True)
class AdapterKey:
    """One published adapter: a persona and one of its versions.

    ``str(key)`` is ``persona@version``, the name the adapter is registered under in a generation engine and
    shown in reports; ``AdapterKey.parse`` reads it back. Code passes the key itself and reads ``persona``
    and ``version`` from it, never by splitting the string.
    """

    persona: str
    version: int

    def __post_init__(self) -> None:
        check_persona_name(self.persona)
        check_version(self.version)

    def __str__(self) -> str:
        return f"{self.persona}{SEPARATOR}{self.version}"

    @classmethod
    def parse(cls, text: str) -> AdapterKey:
        """``"clinician@3"`` -> ``AdapterKey("clinician", 3)``; ``ConfigError`` naming the bad part otherwise."""
        persona, separator, version = str(text).partition(SEPARATOR)
        if not separator:
            raise ConfigError(f"{text!r} is not an adapter key (persona{SEPARATOR}version, e.g. 'clinician@3')",
                              field="adapter")
        if not _VERSION.match(version):
            raise ConfigError(f"{text!r}: {version!r} is not a version (an integer >= 1)", field="version")
        return cls(persona, int(version))
