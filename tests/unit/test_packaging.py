"""The wheel's only top-level import name is ``persona_router``, and it carries every module and data file."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AREAS = ("core", "adapters", "router", "training", "eval", "service", "cli")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("persona_router-*.whl")
    return zipfile.ZipFile(path)


def test_only_persona_router_is_top_level(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"persona_router"}
    top_level = next(n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt"))
    assert wheel.read(top_level).decode().split() == ["persona_router"]


def test_every_module_and_data_file_ships_and_no_test_helper(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    expected = {f"persona_router/{path.relative_to(ROOT).as_posix()}"
                for area in AREAS for path in (ROOT / area).rglob("*")
                if path.is_file() and "__pycache__" not in path.parts}
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel: {missing[:10]}"
    assert "persona_router/core/packs/demo.toml" in names
    assert not [n for n in names if "/tests/" in n or n.endswith("random_model.py")]


def test_console_script_points_into_the_namespace(wheel: zipfile.ZipFile) -> None:
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "persona-router = persona_router.cli.main:main" in wheel.read(entry_points).decode()
