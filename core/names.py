"""Persona and version names: the one rule that packs, the registry, eval specs and the service share."""

from __future__ import annotations

import re

from persona_router.core.errors import ConfigError

# The one persona-name rule: packs validate with it, and it keeps registry paths inside the adapters folder.
PERSONA_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}\Z")  # \Z, not $: "$" also matches before a final newline


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
