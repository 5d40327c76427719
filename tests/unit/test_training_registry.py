"""Adapter registry and manifest: layout, atomic publish, LATEST, name checks, fingerprint refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from persona_router.adapters.manifest import (
    AdapterManifest,
    DatasetInfo,
    TrainMetrics,
    read_manifest_file,
    write_manifest,
)
from persona_router.adapters.registry import LATEST_FILE, AdapterRegistry
from persona_router.core.errors import AdapterError, AdapterIncompatibleError, ConfigError

FINGERPRINT = "sha256:" + "a" * 64


def make_manifest(persona: str = "student", version: int = 1, fingerprint: str = FINGERPRINT) -> AdapterManifest:
    return AdapterManifest(
        persona=persona, version=version, base_model="smollm2-135m-instruct", base_fingerprint=fingerprint,
        dataset=DatasetInfo(source="demo", sha256="sha256:" + "b" * 64, rows_train=80, rows_eval=20,
                            eval_source="demo test split", rows_skipped=1, contexts_truncated=2),
        hyperparameters={"lora_r": 16, "learning_rate": 2e-4, "max_steps": None},
        metrics=TrainMetrics(train_loss=2.1, eval_loss=1.9, eval_loss_before=2.4, steps=16, epochs=0.8,
                             tokens_seen=12345, wall_time_s=120.5, tokens_per_s=150.2, peak_memory_mb=900.0,
                             peak_memory_kind="process_max_rss", train_time_s=80.0, resumed_from_step=0),
        device="cpu", precision="fp32", library_versions={"torch": "2.13.0"},
        extra={"run_hash": "abc", "system_prompt": "Be nice."},
    )


def stage(registry: AdapterRegistry, persona: str = "student", fingerprint: str = FINGERPRINT) -> Path:
    staged = registry.staging_dir(persona)
    (staged / "adapter_config.json").write_text("{}", encoding="utf-8")
    (staged / "adapter_model.safetensors").write_bytes(b"x")
    write_manifest(staged, make_manifest(persona, fingerprint=fingerprint))
    return staged


def test_manifest_json_round_trip_keeps_unknown_keys(tmp_path: Path) -> None:
    manifest = make_manifest()
    write_manifest(tmp_path, manifest)
    assert read_manifest_file(tmp_path) == manifest
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["written_by_a_newer_version"] = {"x": 1}
    assert AdapterManifest.from_json(data).to_json()["written_by_a_newer_version"] == {"x": 1}
    assert manifest.with_version(4).version == 4


def test_manifest_rejects_bad_content(tmp_path: Path) -> None:
    data = make_manifest().to_json()
    del data["metrics"]
    with pytest.raises(AdapterError, match=r"missing keys \['metrics'\]"):
        AdapterManifest.from_json(data)
    with pytest.raises(AdapterError, match="version"):
        make_manifest(version=0)
    with pytest.raises(AdapterError, match=r"no manifest\.json"):
        read_manifest_file(tmp_path)


def test_publish_assigns_versions_and_moves_latest(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    assert registry.personas() == [] and registry.latest("student") is None
    assert registry.publish("student", stage(registry)) == 1
    assert registry.publish("student", stage(registry)) == 2
    assert registry.versions("student") == [1, 2]
    assert registry.latest("student") == 2
    assert (tmp_path / "student" / LATEST_FILE).read_text() == "2\n"
    assert registry.read_manifest("student", 2).version == 2  # the number is assigned at publish
    assert registry.personas() == ["student"]
    assert registry.resolve("student", "latest") == 2 and registry.resolve("student", "1") == 1
    assert not [p for p in (tmp_path / "student").iterdir() if p.name.startswith(".tmp-")]


def test_incomplete_folders_are_ignored_and_never_published(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    registry.publish("student", stage(registry))
    half = tmp_path / "student" / "2"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert registry.versions("student") == [1]
    with pytest.raises(AdapterError, match="no version 2"):
        registry.resolve("student", 2)
    broken = registry.staging_dir("student")
    with pytest.raises(AdapterError, match="incomplete"):
        registry.publish("student", broken)
    assert registry.latest("student") == 1


@pytest.mark.parametrize("name", ["..", "../etc", "/abs", "Student", "a/b", ""])
def test_names_that_leave_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    registry = AdapterRegistry(tmp_path)
    with pytest.raises(ConfigError):
        registry.path(name, 1)
    with pytest.raises(ConfigError):
        registry.path("student", 0)


def test_mismatched_base_fingerprint_is_refused(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    registry.publish("student", stage(registry))
    assert registry.verify_compatible("student", 1, FINGERPRINT).persona == "student"
    with pytest.raises(AdapterIncompatibleError, match="trained on base"):
        registry.verify_compatible("student", 1, "sha256:" + "f" * 64)


def test_lock_is_exclusive_and_sweeps_crashed_temp_folders(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    leftover = registry.staging_dir("student")  # as a killed trainer would leave it
    with registry.lock("student"):
        assert not leftover.exists()
        with pytest.raises(AdapterError, match="another process"), registry.lock("student"):
            pass


def test_latest_pointing_at_garbage_is_an_error(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / LATEST_FILE).write_text("banana\n")
    with pytest.raises(AdapterError, match="not a version"):
        registry.latest("student")
    (tmp_path / "student" / LATEST_FILE).write_text("3\n")
    with pytest.raises(AdapterError, match="missing or incomplete"):
        registry.latest("student")


def test_publish_flushes_the_files_then_the_name_then_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The order that survives a power loss: the version's files on disk before the rename names them, the
    rename on disk before LATEST points at it."""
    import persona_router.adapters.registry as registry_module

    registry = AdapterRegistry(tmp_path)
    staged = stage(registry)
    events: list[tuple[str, bool, bool]] = []

    def seen(kind: str) -> None:
        events.append((kind, registry.path("student", 1).exists(), (registry.persona_dir("student") / LATEST_FILE)
                       .exists()))

    monkeypatch.setattr(registry_module, "fsync_tree", lambda root: seen("files"))
    monkeypatch.setattr(registry_module, "fsync_dir", lambda folder: seen("name"))
    assert registry.publish("student", staged) == 1
    assert events == [("files", False, False), ("name", True, False)]


def test_a_published_version_is_readable_as_a_plain_write_would_be(tmp_path: Path) -> None:
    """mkdtemp's 0700 folder and safetensors' 0600 file must not reach the published tree: an upstream or a
    server running as another user reads the adapters folder (README: scale-out over a shared mount)."""
    import os

    import numpy as np
    from persona_router.core.atomic import default_mode
    from safetensors.numpy import save_file

    registry = AdapterRegistry(tmp_path)
    staged = stage(registry)
    save_file({"w": np.zeros(2)}, str(staged / "adapter_model.safetensors"))  # writes 0600
    assert os.stat(staged).st_mode & 0o777 == 0o700
    version = registry.publish("student", staged)
    folder = registry.path("student", version)
    old = os.umask(0o022)
    os.umask(old)
    assert default_mode(folder=True) == 0o777 & ~old and default_mode(folder=False) == 0o666 & ~old
    assert os.stat(folder).st_mode & 0o777 == default_mode(folder=True)
    for path in folder.iterdir():
        assert os.stat(path).st_mode & 0o777 == default_mode(folder=False), path.name


def test_atomic_folders_get_plain_modes(tmp_path: Path) -> None:
    import os

    from persona_router.core.atomic import atomic_dir, default_mode

    with atomic_dir(tmp_path / "router") as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "w.bin").write_bytes(b"x")
        os.chmod(tmp / "sub" / "w.bin", 0o600)
    assert os.stat(tmp_path / "router").st_mode & 0o777 == default_mode(folder=True)
    assert os.stat(tmp_path / "router" / "sub").st_mode & 0o777 == default_mode(folder=True)
    assert os.stat(tmp_path / "router" / "sub" / "w.bin").st_mode & 0o777 == default_mode(folder=False)
