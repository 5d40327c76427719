"""The Cochrane worked example's data conversion: rows in our schema, held-out rows apart, a clear skip without
the data (it is read from ../shared/data, never copied into the repository)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cochrane_patient" / "prepare.py"


def prepare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cochrane_prepare", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_absent_data_is_a_clear_skip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert prepare().main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 3
    assert "absent" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_converts_val_to_training_rows_and_test_to_held_out(shared_data: Path, tmp_path: Path) -> None:
    from persona_router.core.pack_edit import add_persona
    from persona_router.training.loading import load_qa

    module = prepare()
    assert module.main(["--data", str(shared_data / "cochrane_plain_language"), "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "prepare.json").read_text())
    assert summary["train"]["rows"] == 411 and summary["test"]["rows"] == 480
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert {r["persona"] for r in rows} == {"patient"} and {r["question"] for r in rows} == {module.QUESTION}
    assert all(r["context"] and r["answer"] and r["id"].startswith("val-") for r in rows)
    test_ids = {json.loads(line)["id"] for line in (tmp_path / "test.jsonl").read_text().splitlines()}
    assert all(i.startswith("test-") for i in test_ids) and len(test_ids) == 480
    pack = tmp_path / "pack.toml"
    pack.write_text('name = "p"\n[[personas]]\nname = "general-reader"\ndescription = "d"\nsystem_prompt = "s"\n'
                    'examples = ["q"]\nfallback = true\n')
    add_persona({"name": "patient", "description": "d", "system_prompt": "s", "examples": ["q"]}, pack=pack)
    from persona_router.core.pack import load_pack

    assert len(load_qa(tmp_path / "train.jsonl", load_pack(pack)).records) == 411  # loads as training data
