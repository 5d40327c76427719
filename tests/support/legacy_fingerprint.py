"""The embedder fingerprint that routers saved before the single ``core/fingerprint.py`` recorded.

Kept only for tests: they prove that a router with this old fingerprint is detected as stale and refitted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def legacy_embedder_fingerprint(folder: Path) -> str:
    """``sha256`` over every file of the folder (relative name, NUL, bytes), README and hidden files skipped."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.name not in {"README.md", ".gitattributes"} and not p.name.startswith("."))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(path.read_bytes())
    return f"sha256:{digest.hexdigest()}"
