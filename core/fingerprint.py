"""A stable identity for a saved model: sha256 over its normalised config and its weight files.

The one fingerprint of the project, for two uses:

- a base model (``scope="weights"``): adapters record the fingerprint of the base they were trained on and
  loading one onto another base is refused. The hash covers ``config.json`` (library-version and loading
  keys dropped) and the weight files, so the same checkpoint gets the same fingerprint on CPU and GPU and
  whatever tokenizer files sit next to it.
- an embedder (``scope="all"``): a fitted router records the fingerprint of its embedder, because its
  weights only make sense in that embedding space. Sentence-transformers keeps the pooling, normalisation
  and sequence length in further files of the folder, so those files are hashed too (README and hidden
  files are not).

Hashing a 3.8B model reads ~7.6 GB, so results are cached per folder and scope in
``$PERSONA_ROUTER_HOME/fingerprints.json``, keyed by each hashed file's size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

from persona_router.core.atomic import atomic_write_json
from persona_router.core.errors import BaseModelError
from persona_router.core.home import home_dir

log = logging.getLogger(__name__)

# Config keys that change with the saving library or the loading options, not with the model itself.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype",
     "quantization_config", "use_cache", "architectures", "auto_map", "_attn_implementation_autoset"}
)
_CHUNK = 1 << 24
# Files that describe a model folder but do not change what it computes.
_DOC_FILES = frozenset({"README.md", ".gitattributes"})

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.onnx")

Scope = Literal["weights", "all"]
SCOPES: tuple[Scope, ...] = ("weights", "all")


def normalised_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sorted(config.items()) if k not in _VOLATILE_CONFIG_KEYS}


def weight_files(folder: Path) -> list[Path]:
    """The first kind present: safetensors, else PyTorch ``.bin``, else ONNX (an exported router encoder)."""
    for pattern in WEIGHT_PATTERNS:
        files = sorted(folder.glob(pattern))
        if files:
            return files
    return []


def other_files(folder: Path, hashed: list[Path]) -> list[Path]:
    """Every further file of the folder tree, sorted by relative path: what ``scope="all"`` adds."""
    skip = set(hashed)
    return sorted((p for p in folder.rglob("*")
                   if p.is_file() and p not in skip and p.name not in _DOC_FILES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                  key=lambda p: p.relative_to(folder).as_posix())


def fingerprint_folder(folder: Path, *, scope: Scope = "weights", use_cache: bool = True) -> str:
    """Return ``sha256:<hex>`` for the model saved in ``folder``.

    ``weights``: normalised ``config.json`` + the weight files (a base model). ``all``: the same, then every
    other file's relative path and bytes (an embedder). Raises ``BaseModelError`` for a folder without
    ``config.json`` or weight files.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    folder = Path(folder).resolve()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BaseModelError("no config.json: not a saved model folder", path=folder)
    files = weight_files(folder)
    if not files:
        raise BaseModelError(f"no weight files ({', '.join(WEIGHT_PATTERNS)})", path=folder)
    extra = other_files(folder, [*files, config_path]) if scope == "all" else []
    stamp = [[f.relative_to(folder).as_posix(), f.stat().st_size, f.stat().st_mtime_ns]
             for f in [*files, config_path, *extra]]
    cache = _cache_path()
    key = str(folder) if scope == "weights" else f"{folder}#{scope}"
    cached = _read_cache(cache) if use_cache else {}
    entry = cached.get(key)
    if entry and entry.get("stamp") == stamp:
        return str(entry["fingerprint"])
    digest = hashlib.sha256()
    config = json.loads(config_path.read_text(encoding="utf-8"))
    digest.update(json.dumps(normalised_config(config), sort_keys=True).encode())
    for path in files:
        # Tensor bytes and their layout are all in the file; hashing the raw files avoids loading tensors.
        _update(digest, path)
    for path in extra:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        _update(digest, path)
    fingerprint = f"sha256:{digest.hexdigest()}"
    if use_cache:
        cached[key] = {"stamp": stamp, "fingerprint": fingerprint}
        atomic_write_json(cache, cached)
    log.debug("fingerprint of %s (%s): %s", folder, scope, fingerprint)
    return fingerprint


def _update(digest: Any, path: Path) -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)


def _cache_path() -> Path:
    return home_dir() / "fingerprints.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
