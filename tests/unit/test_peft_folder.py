"""The one adapter-folder check (``adapters/peft_folder.py``) and the places that rely on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from persona_router.adapters.peft_folder import check_adapter_folder
from persona_router.core.errors import AdapterError, ConfigError
from persona_router.eval.specs import parse_spec

from tests.support.adapter_files import write_adapter_folder


def test_a_valid_folder_returns_its_config(tmp_path: Path) -> None:
    folder = write_adapter_folder(tmp_path / "a")
    assert check_adapter_folder(folder)["r"] == 2


@pytest.mark.parametrize(("change", "message"), [
    ("no-config", r"adapter_config\.json is missing"),
    ("bad-json", r"unreadable adapter_config\.json"),
    ("list-config", "not a JSON object"),
    ("not-lora", "only LoRA adapters"),
    ("no-rank", "not a LoRA config"),
    ("modules-to-save", "modules_to_save"),
    ("no-weights", r"adapter_model\.safetensors is missing"),
    ("corrupt-weights", r"corrupt adapter_model\.safetensors"),
    ("empty-weights", "holds no tensors"),
    ("full-layer", "non-LoRA tensors"),
])
def test_each_defect_is_refused_with_a_reason(tmp_path: Path, change: str, message: str) -> None:
    folder = write_adapter_folder(tmp_path / "a")
    config_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    config = json.loads(config_path.read_text())
    if change == "no-config":
        config_path.unlink()
    elif change == "bad-json":
        config_path.write_text("{")
    elif change == "list-config":
        config_path.write_text("[]")
    elif change == "not-lora":
        config_path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    elif change == "no-rank":
        config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "r"}))
    elif change == "modules-to-save":
        config_path.write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    elif change == "no-weights":
        weights.unlink()
    elif change == "corrupt-weights":
        weights.write_bytes(b"not a safetensors file")
    elif change == "empty-weights":
        write_adapter_folder(folder, tensors={})
    elif change == "full-layer":
        write_adapter_folder(folder, tensors={"base_model.model.lm_head.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(AdapterError, match=message):
        check_adapter_folder(folder)


def test_eval_specs_use_the_folder_check(tmp_path: Path) -> None:
    folder = write_adapter_folder(tmp_path / "clinician" / "3")
    assert parse_spec(str(folder)).path == folder.resolve()
    (folder / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match=r"corrupt adapter_model\.safetensors.*valid forms"):
        parse_spec(str(folder))


def test_the_reference_engine_refuses_a_bad_folder_before_touching_the_model(tmp_path: Path) -> None:
    from persona_router.adapters.engine_reference import ReferenceEngine

    class NoModel:
        tokenizer = None
        model = None

    engine = ReferenceEngine(NoModel())  # type: ignore[arg-type]
    folder = write_adapter_folder(tmp_path / "a", tensors={"base_model.model.lm_head.weight": np.zeros(2, np.float32)})
    with pytest.raises(AdapterError, match="non-LoRA tensors"):
        engine.add_adapter("x", folder)
