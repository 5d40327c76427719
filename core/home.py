"""Where persona-router keeps its caches: ``$PERSONA_ROUTER_HOME`` or ``~/.cache/persona-router``."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "PERSONA_ROUTER_HOME"


def home_dir() -> Path:
    """The cache root; created on first use."""
    raw = os.environ.get(HOME_ENV)
    root = Path(raw).expanduser() if raw else Path.home() / ".cache" / "persona-router"
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    path = home_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
