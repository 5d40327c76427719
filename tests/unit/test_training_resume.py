"""--resume on a fake checkpoints folder and a fake registry: which checkpoint it picks, what a file error is
called, and a version that was renamed into place without LATEST following it (no training needed)."""

from __future__ import annotations

import errno
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from persona_router.adapters.manifest import write_manifest
from persona_router.adapters.registry import LATEST_FILE, AdapterRegistry
from persona_router.core.errors import AdapterError
from persona_router.training import trainer
from persona_router.training.checkpoints import (
    RUN_FILE,
    TRAINER_STATE_FILE,
    already_published,
    checkpoint_file_error,
    prepare_workdir,
)

from tests.unit.test_training_registry import make_manifest

RUN = "run-hash-1"


def checkpoints_folder(tmp_path: Path, steps: dict[int, str | None]) -> Path:
    """A .checkpoints folder of this run; ``steps`` maps a step to its trainer state text (None: not written)."""
    work = tmp_path / ".checkpoints"
    work.mkdir()
    (work / RUN_FILE).write_text(json.dumps({"run_hash": RUN}) + "\n", encoding="utf-8")
    for step, state in steps.items():
        folder = work / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        if state is not None:
            (folder / TRAINER_STATE_FILE).write_text(state, encoding="utf-8")
    return work


def test_resume_takes_the_newest_checkpoint_that_was_saved_completely(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Killed mid-save: transformers had not yet written the new checkpoint's trainer state (step 6) or had
    cut it off (step 4), and had not yet deleted the last complete one (step 2)."""
    work = checkpoints_folder(tmp_path, {2: '{"global_step": 2}', 4: '{"global_st', 6: None})
    (work / "checkpoint-latest").mkdir()  # not a step: ignored, not a crash on int()
    with caplog.at_level(logging.WARNING, logger=trainer.__name__):
        assert prepare_workdir(work, RUN, resume=True) == str(work / "checkpoint-2")
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-latest"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-6" in warned and "checkpoint-4" in warned and "incomplete" in warned
    # The next resume finds the same one, quietly.
    assert prepare_workdir(work, RUN, resume=True) == str(work / "checkpoint-2")


def test_resume_with_no_complete_checkpoint_starts_over(tmp_path: Path) -> None:
    work = checkpoints_folder(tmp_path, {3: None})
    assert prepare_workdir(work, RUN, resume=True) is None
    assert sorted(p.name for p in work.iterdir()) == [RUN_FILE]


def test_a_checkpoint_that_cannot_be_read_is_not_reported_as_a_write(tmp_path: Path) -> None:
    work = tmp_path / ".checkpoints"
    checkpoint = str(work / "checkpoint-4")
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", f"{checkpoint}/{TRAINER_STATE_FILE}")
    message = str(checkpoint_file_error("student", missing, work, checkpoint))
    assert "could not read checkpoint" in message and "writing" not in message
    assert "rerun without --resume" in message
    full = OSError(errno.ENOSPC, "No space left on device", str(work / "checkpoint-6" / "optimizer.pt"))
    assert "failed writing a checkpoint" in str(checkpoint_file_error("student", full, work, checkpoint))
    assert "failed writing a checkpoint" in str(checkpoint_file_error("student", OSError("?"), work, None))


def publish_version(registry: AdapterRegistry, version: int, run_hash: str, *, latest: bool) -> None:
    folder = registry.path("student", version)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}", encoding="utf-8")
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    manifest = make_manifest(version=version)
    write_manifest(folder, replace(manifest, extra={**manifest.extra, "run_hash": run_hash}))
    if latest:
        registry.set_latest("student", version)


def test_a_version_renamed_into_place_without_latest_is_found_and_latest_catches_up(tmp_path: Path) -> None:
    """Killed after the rename and before LATEST moved: a resume must not publish the run again as v3."""
    registry = AdapterRegistry(tmp_path)
    publish_version(registry, 1, "old-run", latest=True)
    publish_version(registry, 2, RUN, latest=False)
    found = already_published(registry, "student", RUN)
    assert found is not None and found.version == 2 and registry.latest("student") == 2
    # An older run found again is skipped, but LATEST never moves back to it.
    older = already_published(registry, "student", "old-run")
    assert older is not None and older.version == 1 and registry.latest("student") == 2
    assert already_published(registry, "student", "another-run") is None


def test_latest_does_not_catch_up_to_a_disabled_version(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    publish_version(registry, 1, "old-run", latest=True)
    publish_version(registry, 2, RUN, latest=False)
    registry.set_disabled("student", [2])
    found = already_published(registry, "student", RUN)
    assert found is not None and found.version == 2 and registry.latest("student") == 1


def test_a_failure_after_the_rename_says_the_version_is_on_disk(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    registry = AdapterRegistry(tmp_path)

    def fake_save(model: Any, folder: Path, base_path: str) -> None:
        (folder / "adapter_config.json").write_text("{}", encoding="utf-8")
        (folder / "adapter_model.safetensors").write_bytes(b"x")

    def no_latest(persona: str, version: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(trainer, "save_adapter", fake_save)
    monkeypatch.setattr(registry, "set_latest", no_latest)
    manifest = make_manifest()
    manifest = replace(manifest, extra={**manifest.extra, "run_hash": RUN})
    with pytest.raises(AdapterError) as raised:
        trainer._publish(object(), manifest, registry, 0.0, "base")
    message = str(raised.value)
    assert "version 1 of 'student' is on disk" in message and "nothing was published" not in message
    assert "--resume" in message
    assert registry.versions("student") == [1] and not (registry.persona_dir("student") / LATEST_FILE).exists()
    monkeypatch.undo()
    assert already_published(registry, "student", RUN) is not None and registry.latest("student") == 1
