"""The one model fingerprint (``core/fingerprint.py``) in both scopes: base models and embedders."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from persona_router.core.errors import RouterModelError
from persona_router.core.fingerprint import fingerprint_folder, normalised_config
from persona_router.router.encoder import fingerprint_model_files

from tests.support.legacy_fingerprint import legacy_embedder_fingerprint


def _published_base_hash(folder: Path) -> str:
    """The base fingerprint as adapters have recorded it so far: normalised config, then the weight files."""
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    digest.update(json.dumps(normalised_config(config), sort_keys=True).encode())
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return f"sha256:{digest.hexdigest()}"


def test_base_scope_keeps_the_fingerprint_published_adapters_recorded(tiny_model_dir: Path,
                                                                      isolated_home: Path) -> None:
    assert fingerprint_folder(tiny_model_dir) == _published_base_hash(tiny_model_dir)


def test_embedder_scope_covers_every_model_file_but_docs(tiny_model_dir: Path, tmp_path: Path,
                                                         isolated_home: Path) -> None:
    copy = shutil.copytree(tiny_model_dir, tmp_path / "embedder")
    weights_only, everything = fingerprint_folder(copy), fingerprint_folder(copy, scope="all")
    assert everything != weights_only and everything.startswith("sha256:")
    assert fingerprint_model_files(copy) == everything
    assert fingerprint_folder(copy, scope="all", use_cache=False) == everything  # the cache returns the same

    (copy / "README.md").write_text("a model card")
    (copy / ".cache").mkdir()
    (copy / ".cache" / "lock").write_text("x")
    assert fingerprint_folder(copy, scope="all") == everything

    (copy / "1_Pooling").mkdir()  # sentence-transformers' pooling settings change the embedding
    (copy / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    pooled = fingerprint_folder(copy, scope="all")
    assert pooled != everything
    assert fingerprint_folder(copy) == weights_only  # a base model's identity ignores such files

    (copy / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert fingerprint_folder(copy, scope="all") not in (pooled, everything)


def test_embedder_fingerprint_differs_from_the_one_old_routers_recorded(tiny_model_dir: Path,
                                                                        isolated_home: Path) -> None:
    # So ``PersonaRouter.load`` refuses an old router and ``ensure_router`` refits it (tested in test_router_core).
    assert fingerprint_model_files(tiny_model_dir) != legacy_embedder_fingerprint(tiny_model_dir)


def test_a_folder_that_is_not_a_model_is_a_router_error_for_embedders(tmp_path: Path, isolated_home: Path) -> None:
    (tmp_path / "notes.txt").write_text("no model here")
    with pytest.raises(RouterModelError, match=r"config\.json"):
        fingerprint_model_files(tmp_path)
    with pytest.raises(ValueError, match="scope"):
        fingerprint_folder(tmp_path, scope="everything")  # type: ignore[arg-type]
