"""Bad input is refused before any training: unknown persona, no rows, rows missing fields, leaked eval rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from persona_router.core.errors import DataError, UnknownPersonaError
from persona_router.core.pack import load_pack
from persona_router.training.jobs import DEMO_EVAL_SOURCE, plan_jobs


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_for(persona: str, count: int) -> list[dict[str, str]]:
    return [{"persona": persona, "question": f"question number {i} for {persona}?", "answer": f"answer {i}."}
            for i in range(count)]


def test_demo_jobs_train_on_train_split_and_evaluate_on_test_split() -> None:
    pack = load_pack()
    jobs = plan_jobs(pack, ["student"])
    (job,) = jobs
    assert len(job.train_records) == 80 and len(job.eval_records) == 20
    assert job.eval_source == DEMO_EVAL_SOURCE
    assert all(r.id and "-train-" in r.id for r in job.train_records)
    assert all(r.id and "-test-" in r.id for r in job.eval_records)


def test_unknown_persona_names_the_valid_ones() -> None:
    with pytest.raises(UnknownPersonaError, match="valid personas: clinician"):
        plan_jobs(load_pack(), ["astronaut"])


def test_persona_without_rows_is_a_clear_error_unless_skipped(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "rows.jsonl", rows_for("student", 30))
    pack = load_pack()
    with pytest.raises(DataError, match="no training rows for persona\\(s\\) clinician, educator"):
        plan_jobs(pack, list(pack.names), data=str(data))
    jobs = plan_jobs(pack, list(pack.names), data=str(data), skip_missing=True)
    assert [j.persona.name for j in jobs] == ["student"]
    (job,) = jobs
    assert len(job.train_records) + len(job.eval_records) == 30 and job.eval_records  # held-out fraction
    assert "held-out 10%" in job.eval_source


def test_rows_missing_fields_name_file_line_and_field(tmp_path: Path) -> None:
    rows = rows_for("student", 2)
    del rows[1]["answer"]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError) as info:
        plan_jobs(load_pack(), ["student"], data=str(data))
    assert "rows.jsonl:2" in str(info.value) and "'answer'" in str(info.value)


def test_empty_file_and_eval_rows_that_are_training_rows(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="contains no rows"):
        plan_jobs(load_pack(), ["student"], data=str(empty))
    data = write_rows(tmp_path / "rows.jsonl", rows_for("student", 5))
    with pytest.raises(DataError, match="ask a question the training rows ask too"):
        plan_jobs(load_pack(), ["student"], data=str(data), eval_data=str(data))
    # Another answer (and other spacing or case) to a trained question is not held-out data either.
    reworded = [{**row, "question": "  " + row["question"].upper(), "answer": "a different answer."}
                for row in rows_for("student", 1)]
    with pytest.raises(DataError, match="ask a question the training rows ask too"):
        plan_jobs(load_pack(), ["student"], data=str(data), eval_data=str(write_rows(tmp_path / "e.jsonl", reworded)))
    # The same question over another context is another item.
    other_context = [{**row, "context": "another passage to work from."} for row in rows_for("student", 1)]
    (job,) = plan_jobs(load_pack(), ["student"], data=str(data),
                       eval_data=str(write_rows(tmp_path / "c.jsonl", other_context)))
    assert len(job.eval_records) == 1


def test_a_held_out_split_never_trips_the_overlap_check_on_reworded_rows(tmp_path: Path) -> None:
    """Rows differing only in case or spacing were split apart by the holdout and then refused as leaked
    eval rows (field eval-data), though no --eval-data was given."""
    rows = [{"persona": "student", "question": f"{spelling} stroke {i}?", "answer": "a."}
            for i in range(100) for spelling in ("What is a", "what is a")]
    (job,) = plan_jobs(load_pack(), ["student"], data=str(write_rows(tmp_path / "rows.jsonl", rows)))
    held = {r.question.lower() for r in job.eval_records}
    assert held and not held & {r.question.lower() for r in job.train_records}
