"""A stable identity for a base model: sha256 over its normalised config and every weight tensor.

Adapters record the fingerprint of the base they were trained on; loading one onto another base is
refused. The hash is computed from the saved folder (the source of truth, before any quantisation), so the
same checkpoint gets the same fingerprint on CPU and GPU. Hashing a 3.8B model reads ~7.6 GB, so results
are cached per folder, keyed by each weight file's size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

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


def normalised_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sorted(config.items()) if k not in _VOLATILE_CONFIG_KEYS}


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(folder.glob("*.bin"))
    return files


def fingerprint_folder(folder: Path, *, use_cache: bool = True) -> str:
    """Return ``sha256:<hex>`` for the model saved in ``folder`` (config.json + weight files)."""
    folder = Path(folder).resolve()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BaseModelError("no config.json: not a saved model folder", path=folder)
    files = weight_files(folder)
    if not files:
        raise BaseModelError("no *.safetensors or *.bin weight files", path=folder)
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in [*files, config_path]]
    cache = _cache_path()
    cached = _read_cache(cache) if use_cache else {}
    entry = cached.get(str(folder))
    if entry and entry.get("stamp") == stamp:
        return str(entry["fingerprint"])
    digest = hashlib.sha256()
    config = json.loads(config_path.read_text(encoding="utf-8"))
    digest.update(json.dumps(normalised_config(config), sort_keys=True).encode())
    for path in files:
        # Tensor bytes and their layout are all in the file; hashing the raw files avoids loading tensors.
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    fingerprint = f"sha256:{digest.hexdigest()}"
    if use_cache:
        cached[str(folder)] = {"stamp": stamp, "fingerprint": fingerprint}
        atomic_write_json(cache, cached)
    log.debug("fingerprint of %s: %s", folder, fingerprint)
    return fingerprint


def _cache_path() -> Path:
    return home_dir() / "fingerprints.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
