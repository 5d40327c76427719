"""What the adapter residency (``adapters/residency.py``) reads from and writes to the adapters folder, apart
from its load/evict policy: scanning the registry, the folder and file stamps that tell a change, the cheap
checks before an engine load, the existence check behind 404s and the ``DISABLED.json`` record. A base class of
``AdapterResidency``; the methods are the residency's own, moved here unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from persona_router.adapters.peft_folder import check_adapter_folder
from persona_router.adapters.registry import DISABLED_FILE, LATEST_FILE, AdapterRegistry
from persona_router.adapters.residency_types import AdapterNotFoundError, Stamp
from persona_router.core.atomic import file_stamp
from persona_router.core.errors import AdapterError, PersonaRouterError, UnknownPersonaError, public_message

# The residency's logger, so that records keep the name they had before the split.
log = logging.getLogger("persona_router.adapters.residency")


class ResidencyFolder:
    """The adapters-folder side of ``AdapterResidency`` (which sets these attributes in its ``__init__``)."""

    registry: AdapterRegistry
    base_fingerprint: str
    personas: tuple[str, ...]
    _versions: dict[str, list[int]]
    _disabled: set[tuple[str, int]]

    def _validate(self, persona: str, version: int) -> None:
        """Manifest, base fingerprint, config and weights header: cheap checks before the engine loads."""
        self.registry.verify_compatible(persona, version, self.base_fingerprint)
        check_adapter_folder(self.registry.path(persona, version))

    def _scan(self) -> dict[str, tuple[list[int], int | None, set[int], str | None]]:
        found: dict[str, tuple[list[int], int | None, set[int], str | None]] = {}
        on_disk = set(self.registry.personas())
        unknown = on_disk - set(self.personas)
        if unknown:
            log.warning("adapters folder has personas not in the pack (ignored): %s", ", ".join(sorted(unknown)))
        for persona in self.personas:
            try:
                versions = self.registry.versions(persona)
                latest = self.registry.latest(persona)
                disabled = self.registry.disabled(persona)
            except PersonaRouterError as exc:
                log.warning("adapters of %s: %s", persona, exc)
                found[persona] = (self._versions.get(persona, []), None, set(), public_message(exc))
                continue
            found[persona] = (versions, latest, disabled, None)
        return found

    def folder_stamp(self) -> tuple[Any, ...]:
        """A cheap summary of the adapters folder: persona folders, their versions, LATEST and DISABLED files."""
        root = self.registry.root
        if not root.is_dir():
            return ()
        entries = []
        for persona in self.personas:
            folder = root / persona
            if not folder.is_dir():
                continue
            pointer = folder / LATEST_FILE
            latest = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
            versions = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
            # Another server sharing the folder may disable a version.
            entries.append((persona, latest, tuple(versions), file_stamp(folder / DISABLED_FILE)))
        return tuple(entries)

    def _file_stamp(self, persona: str, version: int) -> Stamp:
        folder = self.registry.path(persona, version)
        stamp = []
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.is_file():
                info = path.stat()
                stamp.append((path.name, info.st_size, info.st_mtime_ns))
        return tuple(stamp)

    def _check_exists(self, persona: str, version: int) -> None:
        if persona not in self.personas:
            raise UnknownPersonaError(persona, self.personas)
        if version not in self.registry.versions(persona):
            have = ", ".join(map(str, self.registry.versions(persona))) or "none"
            raise AdapterNotFoundError(f"persona {persona!r} has no version {version} (versions: {have})",
                                       field="version")

    def _save_disabled(self, persona: str, *, disable: tuple[int, ...] = (), enable: tuple[int, ...] = ()) -> set[int]:
        """Record the change in ``DISABLED.json``; returns every version the file now disables, other
        servers' changes included."""
        try:
            return self.registry.change_disabled(persona, disable=disable, enable=enable)
        except OSError as exc:
            log.error("could not record the disabled versions of %s: %s", persona, exc)
            raise AdapterError(f"could not record the disabled versions of {persona!r} in the adapters folder "
                               f"({type(exc).__name__}); the change holds until restart only") from exc
