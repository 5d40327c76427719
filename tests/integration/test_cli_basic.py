"""The CLI skeleton end to end: the pack as JSON, a real answer from the offline model, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "persona_router", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_personas_json_lists_the_five() -> None:
    result = cli("personas", "--json")
    assert result.returncode == 0, result.stderr
    personas = json.loads(result.stdout)
    assert [p["name"] for p in personas] == ["student", "clinician", "educator", "engineer", "general-reader"]
    assert [p["fallback"] for p in personas] == [False, False, False, False, True]
    assert all(p["description"] for p in personas)


def test_bad_base_is_a_clear_error_without_traceback(tmp_path: Path) -> None:
    result = cli("generate", "--persona", "student", "--base", str(tmp_path / "nope"), "hi?")
    assert result.returncode == 2
    assert "no such model folder" in result.stderr and "Traceback" not in result.stderr


def test_unknown_persona_and_bad_pack_are_clear_errors(tmp_path: Path) -> None:
    result = cli("generate", "--persona", "pirate", "hi?")
    assert result.returncode == 2 and "valid personas" in result.stderr and "Traceback" not in result.stderr
    pack = tmp_path / "p.toml"
    pack.write_text('name = "p"\n[[personas]]\nname = "x"\n', encoding="utf-8")
    result = cli("personas", "--pack", str(pack))
    assert result.returncode == 2 and "p.toml" in result.stderr and "personas[0].description" in result.stderr


@pytest.mark.slow
def test_generate_answers_with_the_real_offline_model() -> None:
    result = cli("generate", "--persona", "student", "--max-new-tokens", "48", "Why is the sky blue?")
    assert result.returncode == 0, result.stderr[-2000:]
    answer = result.stdout.strip()
    assert len(answer.split()) >= 10
    assert any(word in answer.lower() for word in ("light", "scatter", "blue", "sun"))


def test_route_json_prints_only_json_lines_on_stdout(tmp_path: Path) -> None:
    """``persona-router route --json ... 2>/dev/null`` is machine-readable: every stdout line parses as JSON
    (model-loading warnings of transformers or bitsandbytes go to stderr)."""
    questions = ["renal dose of apixaban at CrCl 25?", "how do I teach fractions to year 4?", "lorem ipsum"]
    source = tmp_path / "q.jsonl"
    source.write_text(json.dumps({"question": "why does my code segfault?", "persona": "engineer"}) + "\n")
    result = cli("route", "--json", *questions, "--input", str(source))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    decisions = [json.loads(line) for line in lines]  # fails on any non-JSON line
    assert [d["question"] for d in decisions] == [*questions, "why does my code segfault?"]
    assert all(d["persona"] and d["source"] in ("explicit", "inferred", "fallback") for d in decisions)
    assert decisions[-1]["source"] == "explicit"
