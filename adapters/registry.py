"""The adapter registry on disk, shared by ``persona-router train`` (writer) and the HTTP service (reader).

Layout::

    <root>/<persona>/<version>/adapter_config.json      standard PEFT files
                              /adapter_model.safetensors
                              /manifest.json            adapters/manifest.py
    <root>/<persona>/LATEST                              the published version number, e.g. "3\\n"
    <root>/<persona>/DISABLED.json                       versions an admin disabled: {"disabled": [1]}

Versions are integers 1, 2, 3, ... A version folder appears only complete: the trainer builds it under a
``.tmp-*`` name and :meth:`AdapterRegistry.publish` renames it into place, then rewrites ``LATEST`` atomically.
Readers therefore never see a half-written adapter, and a crash between the rename and the pointer update
leaves the old ``LATEST`` in force. Names starting with ``.`` (temp folders, checkpoints, locks) are never
listed.

Reader API (what the service needs)::

    registry = AdapterRegistry(default_adapters_dir())
    registry.personas()                      # ["clinician", "student"]
    registry.versions("student")             # [1, 2]
    registry.latest("student")               # 2, or None when nothing is published
    registry.path("student", 2)              # Path, validated to stay inside the root
    registry.read_manifest("student", 2)     # AdapterManifest
    registry.verify_compatible("student", 2, base.fingerprint)   # raises AdapterIncompatibleError
    registry.resolve("student", "latest")    # -> 2; accepts an int, "3" or "latest"
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from persona_router.adapters.manifest import MANIFEST_FILE, AdapterManifest, read_manifest_file, write_manifest
from persona_router.adapters.peft_folder import CONFIG_FILE, WEIGHTS_FILE
from persona_router.core.atomic import (
    TMP_PREFIX,
    atomic_write_text,
    fsync_dir,
    fsync_tree,
    remove_stale_temps,
    share_tree,
)
from persona_router.core.errors import AdapterError, AdapterIncompatibleError, ConfigError
from persona_router.core.file_lock import file_lock
from persona_router.core.home import home_dir
from persona_router.core.names import PERSONA_NAME, check_persona_name, check_version

log = logging.getLogger(__name__)

ADAPTERS_ENV = "PERSONA_ROUTER_ADAPTERS"
LATEST_FILE = "LATEST"
DISABLED_FILE = "DISABLED.json"
DISABLED_LOCK = ".disabled.lock"
LATEST = "latest"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE)  # a complete version; contents: peft_folder
_VERSION_DIR = re.compile(r"^[1-9][0-9]*$")


def default_adapters_dir() -> Path:
    """``$PERSONA_ROUTER_ADAPTERS`` or ``$PERSONA_ROUTER_HOME/adapters`` (``~/.cache/persona-router/adapters``)."""
    raw = os.environ.get(ADAPTERS_ENV)
    return Path(raw).expanduser() if raw else home_dir() / "adapters"


class AdapterRegistry:
    """Versioned adapters under one root folder. Cheap to construct; every call reads the disk."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_adapters_dir()

    def __repr__(self) -> str:
        return f"AdapterRegistry({str(self.root)!r})"

    # --- reading -------------------------------------------------------------------------------------------

    def personas(self) -> list[str]:
        """Personas with at least one published version (a ``LATEST`` pointer)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and PERSONA_NAME.match(p.name) and (p / LATEST_FILE).is_file())

    def versions(self, persona: str) -> list[int]:
        """Complete version folders of ``persona``, ascending (unpublished leftovers included only if complete)."""
        folder = self.persona_dir(persona)
        if not folder.is_dir():
            return []
        found = [int(p.name) for p in folder.iterdir() if p.is_dir() and _VERSION_DIR.match(p.name)
                 and all((p / name).is_file() for name in ADAPTER_FILES)]
        return sorted(found)

    def latest(self, persona: str) -> int | None:
        """The published version, or None when ``persona`` has none."""
        pointer = self.persona_dir(persona) / LATEST_FILE
        try:
            text = pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not _VERSION_DIR.match(text):
            raise AdapterError(f"LATEST holds {text!r}, not a version number", path=pointer)
        version = int(text)
        if not self._is_complete(persona, version):
            raise AdapterError(f"LATEST points at version {version}, which is missing or incomplete", path=pointer)
        return version

    def resolve(self, persona: str, version: int | str = LATEST) -> int:
        """Turn ``"latest"``, ``"3"`` or ``3`` into an existing version number, or raise AdapterError."""
        if version == LATEST:
            latest = self.latest(persona)
            if latest is None:
                raise AdapterError(f"no trained adapter for persona {persona!r}; run: persona-router train "
                                   f"--persona {persona}", path=self.root)
            return latest
        if isinstance(version, str):
            if not _VERSION_DIR.match(version):
                raise ConfigError(f"{version!r} is not a version (an integer >= 1 or 'latest')", field="version")
            version = int(version)
        check_version(version)
        if not self._is_complete(persona, version):
            have = ", ".join(map(str, self.versions(persona))) or "none"
            raise AdapterError(f"persona {persona!r} has no version {version} (versions: {have})", path=self.root)
        return version

    def persona_dir(self, persona: str) -> Path:
        return self._inside(self.root / check_persona_name(persona))

    def path(self, persona: str, version: int) -> Path:
        """The folder of one version (it may not exist); never outside the root."""
        return self._inside(self.persona_dir(persona) / str(check_version(version)))

    def read_manifest(self, persona: str, version: int) -> AdapterManifest:
        manifest = read_manifest_file(self.path(persona, version))
        if manifest.persona != persona or manifest.version != version:
            raise AdapterError(f"manifest says {manifest.persona!r} version {manifest.version}, but the folder is "
                               f"{persona!r} version {version}", path=self.path(persona, version))
        return manifest

    def verify_compatible(self, persona: str, version: int, base_fingerprint: str) -> AdapterManifest:
        """Return the manifest, or raise AdapterIncompatibleError if the adapter was trained on another base."""
        manifest = self.read_manifest(persona, version)
        check_fingerprint(manifest, base_fingerprint, where=self.path(persona, version))
        return manifest

    # --- writing -------------------------------------------------------------------------------------------

    def next_version(self, persona: str) -> int:
        folder = self.persona_dir(persona)
        taken = [int(p.name) for p in folder.iterdir() if _VERSION_DIR.match(p.name)] if folder.is_dir() else []
        return max(taken, default=0) + 1

    def publish(self, persona: str, staged: Path) -> int:
        """Move a complete staged folder into the next free version, then point ``LATEST`` at it.

        ``staged`` must sit inside ``<root>/<persona>/`` (same filesystem, so the rename is atomic). Two
        publishers racing for the same number cannot both win: ``rename`` onto an existing non-empty folder
        fails and the loser takes the next number.
        """
        staged = Path(staged)
        if staged.parent.resolve() != self.persona_dir(persona).resolve():
            raise AdapterError("a staged adapter must sit in the persona's folder", path=staged)
        missing = [name for name in ADAPTER_FILES if not (staged / name).is_file()]
        if missing:
            raise AdapterError(f"staged adapter is incomplete: missing {missing}", path=staged)
        manifest = read_manifest_file(staged)
        share_tree(staged)  # the staging folder and safetensors files are private; servers may run as others
        fsync_tree(staged)  # LATEST is flushed when it moves: the files it will point at must be on disk first
        for _ in range(100):
            version = self.next_version(persona)
            if manifest.version != version:
                manifest = manifest.with_version(version)
                write_manifest(staged, manifest)
            target = self.path(persona, version)
            try:
                staged.rename(target)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue
                raise
            fsync_dir(target.parent)  # the version's name is on disk before LATEST names it
            self.set_latest(persona, version)
            log.info("published %s version %d at %s", persona, version, target)
            return version
        raise AdapterError("could not find a free version number after 100 tries", path=self.persona_dir(persona))

    def set_latest(self, persona: str, version: int) -> None:
        if not self._is_complete(persona, version):
            raise AdapterError(f"version {version} of {persona!r} is missing or incomplete",
                               path=self.persona_dir(persona))
        atomic_write_text(self.persona_dir(persona) / LATEST_FILE, f"{version}\n")

    def disabled(self, persona: str) -> set[int]:
        """Versions an admin disabled: they stay on disk but never serve, across restarts."""
        path = self.persona_dir(persona) / DISABLED_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as exc:
            raise AdapterError(f"unreadable {DISABLED_FILE} ({exc})", path=path) from exc
        versions = raw.get("disabled") if isinstance(raw, dict) else None
        if not isinstance(versions, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in versions):
            raise AdapterError('must hold {"disabled": [version, ...]}', path=path)
        return set(versions)

    def set_disabled(self, persona: str, versions: Iterable[int]) -> None:
        """Record the disabled versions atomically (temp file + rename); none: the marker goes away."""
        path = self.persona_dir(persona) / DISABLED_FILE
        ordered = sorted({check_version(v) for v in versions})
        if ordered:
            atomic_write_text(path, json.dumps({"disabled": ordered}) + "\n")
        else:
            path.unlink(missing_ok=True)

    def change_disabled(self, persona: str, *, disable: Iterable[int] = (), enable: Iterable[int] = ()) -> set[int]:
        """Disable and enable versions against what the file holds now (read, change, write, under a lock of
        its own), so that servers sharing the folder never undo each other's changes; returns the new set."""
        with file_lock(self.persona_dir(persona) / DISABLED_LOCK):  # held for one small read and write
            versions = (self.disabled(persona) | {check_version(v) for v in disable}) - set(enable)
            self.set_disabled(persona, versions)
        return versions

    def staging_dir(self, persona: str) -> Path:
        """A fresh temp folder inside the persona's folder for building a new version."""
        import tempfile

        folder = self.persona_dir(persona)
        folder.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}stage-", dir=folder))

    @contextlib.contextmanager
    def lock(self, persona: str) -> Iterator[None]:
        """Hold an exclusive lock on the persona's folder (one trainer per persona at a time)."""
        folder = self.persona_dir(persona)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(file_lock(folder / ".lock", wait=False))
            except BlockingIOError as exc:
                raise AdapterError(f"another process is training persona {persona!r}", path=folder) from exc
            # Under the lock nobody else is publishing, so a temp folder is a crashed writer's leftover
            # (DISABLED.json's temp files belong to its own lock).
            remove_stale_temps(folder, keep=f"{TMP_PREFIX}{DISABLED_FILE}-")
            yield

    # --- helpers -------------------------------------------------------------------------------------------

    def _is_complete(self, persona: str, version: int) -> bool:
        folder = self.path(persona, version)
        return all((folder / name).is_file() for name in ADAPTER_FILES)

    def _inside(self, path: Path) -> Path:
        root = self.root.resolve()
        resolved = path.resolve()
        if resolved != root and root not in resolved.parents:
            raise ConfigError(f"{path} leaves the adapters folder {root}", field="persona")
        return path


def check_fingerprint(manifest: AdapterManifest, base_fingerprint: str, *, where: Path | str) -> None:
    if manifest.base_fingerprint != base_fingerprint:
        raise AdapterIncompatibleError(
            f"adapter {manifest.persona!r} v{manifest.version} was trained on base {manifest.base_model!r} "
            f"({manifest.base_fingerprint[:19]}...), but the loaded base has fingerprint {base_fingerprint[:19]}...; "
            "retrain it on this base or load the base it was trained on",
            path=where,
        )
