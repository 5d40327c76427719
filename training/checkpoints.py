"""A training run's working folder: checkpoints to resume from, and what a run that stopped part-way left.

transformers writes each checkpoint into ``.checkpoints/checkpoint-N`` (its trainer state last) and the
registry publishes by renaming a staged folder into place and then moving ``LATEST``; a kill can land between
any two of those steps, and ``train --resume`` must pick up from what is on disk without training twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from persona_router.adapters.manifest import AdapterManifest
from persona_router.adapters.registry import AdapterRegistry
from persona_router.core.errors import AdapterError, PersonaRouterError

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = ".checkpoints"
RUN_FILE = "run.json"
# transformers writes a checkpoint's trainer state last: a folder without a readable one is a save cut short.
TRAINER_STATE_FILE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-([0-9]+)$")


def prepare_workdir(work: Path, run_hash: str, *, resume: bool) -> str | None:
    """Return the checkpoint to resume from, or None after clearing stale state for a fresh start."""
    if resume and work.is_dir():
        try:
            recorded = json.loads((work / RUN_FILE).read_text(encoding="utf-8")).get("run_hash")
        except (OSError, ValueError):
            recorded = None
        if recorded is not None and recorded != run_hash:
            raise AdapterError("the checkpoint was made with other settings, data or base; rerun without --resume "
                               "to start over", path=work)
        checkpoint = resume_point(work) if recorded == run_hash else None
        if checkpoint is not None:
            log.info("resuming from %s", checkpoint)
            return str(checkpoint)
        log.info("no complete checkpoint in %s; starting over", work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / RUN_FILE).write_text(json.dumps({"run_hash": run_hash}) + "\n", encoding="utf-8")
    return None


def resume_point(work: Path) -> Path | None:
    """The newest checkpoint in ``work`` that transformers finished writing, or None.

    transformers writes a checkpoint's trainer state last and deletes the older checkpoint only once the new
    one is saved, so a kill mid-save leaves a newer, incomplete folder beside the last complete one. Such a
    folder can never be resumed from, so it is removed (else every resume would warn about it again; the
    resumed run writes that step's folder afresh when it gets there).
    """
    found = sorted(((int(match.group(1)), path) for path in work.iterdir()
                    if (match := _CHECKPOINT_NAME.match(path.name)) and path.is_dir()), reverse=True)
    for _, folder in found:
        if _finished_checkpoint(folder):
            return folder
        log.warning("removing the incomplete checkpoint %s (no readable %s: the run stopped while saving it)",
                    folder, TRAINER_STATE_FILE)
        shutil.rmtree(folder, ignore_errors=True)
    return None


def _finished_checkpoint(folder: Path) -> bool:
    path = folder / TRAINER_STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):  # not written yet, or cut off mid-write
        return False
    except OSError as exc:  # unreadable for another reason: never delete a checkpoint over that
        raise AdapterError(f"cannot read the checkpoint's {TRAINER_STATE_FILE} ({exc})", path=path) from exc
    return isinstance(state, dict)


def already_published(registry: AdapterRegistry, persona: str, run_hash: str) -> AdapterManifest | None:
    """The newest complete version that this exact run published, or None; ``LATEST`` moves to it if older.

    Not only the version ``LATEST`` names: a kill between renaming a version into place and moving ``LATEST``
    leaves the version on disk with ``LATEST`` behind it. Runs under the persona's lock, the one ``publish``
    holds, so nobody else moves ``LATEST`` meanwhile.
    """
    found = _published_by(registry, persona, run_hash)
    if found is not None:
        _catch_up_latest(registry, persona, found.version)
    return found


def _published_by(registry: AdapterRegistry, persona: str, run_hash: str) -> AdapterManifest | None:
    for version in reversed(registry.versions(persona)):
        try:
            manifest = registry.read_manifest(persona, version)
        except PersonaRouterError:
            continue  # an unreadable manifest is no proof of this run
        if manifest.extra.get("run_hash") == run_hash:
            return manifest
    return None


def _catch_up_latest(registry: AdapterRegistry, persona: str, version: int) -> None:
    """Point ``LATEST`` at ``version`` if it names an older one (or nothing usable); never move it back."""
    try:
        latest = registry.latest(persona)
    except AdapterError:
        latest = None  # LATEST names a missing version: a complete one of this run is better
    if latest is not None and latest >= version:
        return
    if version in registry.disabled(persona):
        log.warning("%s: version %d holds this run but is disabled; LATEST stays at %s", persona, version, latest)
        return
    try:
        registry.set_latest(persona, version)
    except OSError as exc:
        raise AdapterError(f"could not point LATEST at version {version} ({exc})",
                           path=registry.persona_dir(persona)) from exc
    log.warning("%s: version %d of this run was on disk but LATEST named %s (stopped between publishing and "
                "moving LATEST); LATEST now names version %d", persona, version, latest, version)


def publish_error(registry: AdapterRegistry, manifest: AdapterManifest, staged: Path, exc: OSError) -> AdapterError:
    """What an OSError while publishing left behind. Before the rename nothing is published; after it (flushing
    the folder's name or moving ``LATEST`` failed) the version is on disk and ``LATEST`` may still name the one
    before, which ``train --resume`` with the same settings fixes without training again."""
    if staged.exists():
        return AdapterError(f"could not write the adapter ({exc}); nothing was published", path=staged)
    name = manifest.persona
    try:
        found = _published_by(registry, name, str(manifest.extra.get("run_hash")))
    except OSError:  # the disk that just failed may fail the listing too; the message stays true without it
        found = None
    written = f"version {found.version}" if found is not None else "a new version"
    return AdapterError(f"{written} of {name!r} is on disk, but publishing it did not finish ({exc}); LATEST may "
                        "still name the version before it: rerun with --resume and the same settings to point "
                        "LATEST at it without training again", path=registry.persona_dir(name))


def checkpoint_file_error(name: str, exc: OSError, work: Path, checkpoint: str | None) -> AdapterError:
    """Name the way an OSError during training went: a checkpoint that cannot be read fails every resume alike
    (rerunning with --resume cannot help), while a failed write (a full disk) can be resumed once fixed."""
    failed = os.path.abspath(os.fsdecode(exc.filename)) if isinstance(exc.filename, (str, bytes)) else None
    if checkpoint is not None and failed is not None and _inside(failed, checkpoint):
        return AdapterError(f"training {name!r} could not read checkpoint {checkpoint} ({exc}); the published "
                            "adapters are unchanged; remove that folder (the next --resume then takes an earlier "
                            "complete checkpoint or starts over) or rerun without --resume", path=Path(checkpoint))
    what = "failed writing a checkpoint" if failed is None or _inside(failed, str(work)) else "failed on a file"
    return AdapterError(f"training {name!r} {what} ({exc}); the published adapters are unchanged, fix the cause "
                        "and rerun with --resume", path=work)


def _inside(path: str, folder: str) -> bool:
    folder = os.path.abspath(folder)
    return path == folder or path.startswith(folder + os.sep)
