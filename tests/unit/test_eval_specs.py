"""Arm SPEC parsing: every valid form, and errors that name the valid forms."""

from __future__ import annotations

from pathlib import Path

import pytest
from persona_router.core.errors import ConfigError
from persona_router.eval.specs import parse_spec

from tests.support.adapter_files import write_adapter_folder


def test_valid_forms(tmp_path: Path) -> None:
    assert parse_spec("base").kind == "base"
    assert parse_spec("prompt").kind == "prompt"
    spec = parse_spec("clinician@3")
    assert (spec.kind, spec.persona, spec.version, spec.label) == ("adapter", "clinician", "3", "clinician@3")
    assert parse_spec(" general-reader@latest ").version == "latest"
    folder = write_adapter_folder(tmp_path / "clinician" / "3")
    spec = parse_spec(str(folder))
    assert spec.kind == "adapter" and spec.path == folder.resolve() and spec.persona is None


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("clinician", "not a valid arm"),
    ("Clinician@3", "not a persona name"),
    ("@3", "not a persona name"),
    ("clinician@", "not a version"),
    ("clinician@3 4", "not a version"),
    ("./no/such/folder", "no such adapter folder"),
])
def test_errors_name_the_valid_forms(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_spec(text, field="a")
    assert "valid forms" in str(info.value) and "'prompt'" in str(info.value) and "field 'a'" in str(info.value)


def test_a_folder_without_adapter_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"adapter_config\.json is missing"):
        parse_spec(str(tmp_path))
