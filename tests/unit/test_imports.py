"""Every module imports on a CPU-only machine, without heavy optional libraries loaded at import time."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AREAS = ("core", "adapters", "router", "training", "eval", "service", "cli")


def all_modules() -> list[str]:
    names = ["persona_router"]
    for area in AREAS:
        names.append(f"persona_router.{area}")
        for info in pkgutil.walk_packages([str(ROOT / area)], prefix=f"persona_router.{area}."):
            names.append(info.name)
    return sorted(names)


def test_every_module_imports_without_a_gpu() -> None:
    modules = all_modules()
    assert len(modules) > 10
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = [m for m in ('bitsandbytes', 'trl', 'sentence_transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HEAVY []" in result.stdout, result.stdout


@pytest.mark.parametrize("module", ["persona_router", "persona_router.cli.main"])
def test_cli_help_is_instant(module: str) -> None:
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0 and "persona-router" in result.stdout
