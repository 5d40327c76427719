from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from persona_router.core.errors import ConfigError, DataError
from persona_router.core.pack import load_pack
from persona_router.training.loading import load_qa
from persona_router.training.persona_mapping import PersonaMapping

ROWS = [
    {"persona": "student", "question": "What is a cell?", "answer": "A tiny living unit.",
     "domain": "Natural Science"},
    {"persona": "clinician", "question": "Dose of X?", "answer": "10 mg.", "context": "Label says 10 mg."},
]
WEBSCALE = [
    {"pretrain_text": "Doc about maps.", "domain": "Education", "persona": " educators", "question": "Q1?",
     "answer": "A1"},
    {"pretrain_text": "Doc about code.", "domain": "Coding", "persona": "Computer science students",
     "question": "Q2?", "answer": "A2"},
    {"pretrain_text": "Doc about tax.", "domain": "Commerce & Economics", "persona": " Policymakers",
     "question": "Q3?", "answer": "A3"},
    {"original_material": "Doc about care.", "domain": "Education", "persona": "Caregivers", "question": "Q4?",
     "answer": "A4"},
]


@pytest.fixture(scope="module")
def pack() -> Any:
    return load_pack()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_json_csv_parquet_give_the_same_records(tmp_path: Path, pack: Any) -> None:
    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(ROWS), encoding="utf-8")
    as_csv = tmp_path / "d.csv"
    with open(as_csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["persona", "question", "answer", "domain", "context"])
        writer.writeheader()
        writer.writerows(ROWS)
    import pyarrow as pa
    import pyarrow.parquet as pq

    as_parquet = tmp_path / "d.parquet"
    columns = ["persona", "question", "answer", "domain", "context"]
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in ROWS]), as_parquet)
    loaded = [load_qa(p, pack).records for p in (jsonl, as_json, as_csv, as_parquet)]
    assert all(records == loaded[0] for records in loaded)
    assert loaded[0][1].context == "Label says 10 mg." and loaded[0][0].context is None


def test_hub_dataset_by_name(monkeypatch: pytest.MonkeyPatch, pack: Any) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name: str, split: str) -> Any:
        calls.append((name, split))
        return datasets.Dataset.from_list(WEBSCALE)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    loaded = load_qa("Salesforce/Webscale-RL", pack, split="train")
    assert calls == [("Salesforce/Webscale-RL", "train")]
    assert [r.persona for r in loaded.records] == ["educator", "engineer"]


def test_webscale_rows_map_and_unmapped_are_counted(tmp_path: Path, pack: Any) -> None:
    loaded = load_qa(write_jsonl(tmp_path / "w.jsonl", WEBSCALE), pack)
    assert [(r.persona, r.context) for r in loaded.records] == [("educator", "Doc about maps."),
                                                                ("engineer", "Doc about code.")]
    report = loaded.report
    assert (report.rows, report.kept, report.mapped_exact, report.unmapped_rows) == (4, 2, 2, 2)
    assert dict(report.unmapped) == {"Policymakers": 1, "Caregivers": 1}
    assert "2 unmapped" in report.summary()


def test_similarity_mapping_above_threshold_only(pack: Any) -> None:
    # A toy embedding: a label is close to a persona whose description shares its first letter.
    def embed(texts: Any) -> list[list[float]]:
        return [[1.0 if t.strip().lower().startswith(c) else 0.0 for c in "scegx"] + [0.1] for t in texts]

    mapping = PersonaMapping.from_pack(pack, threshold=0.9, embed=embed)
    assert mapping.map_label("Caregivers") == ("clinician", "similarity")
    assert mapping.map_label("zookeepers") == (None, "unmapped")
    assert mapping.map_label("Teachers") == ("educator", "exact")
    with pytest.raises(ConfigError, match="threshold"):
        PersonaMapping.from_pack(pack, threshold=1.5, embed=embed)


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"persona": "student", "question": "Q?"}, "answer", "is missing"),
        ({"persona": "student", "question": " ", "answer": "A"}, "question", "non-empty"),
        ({"persona": "pirate", "question": "Q?", "answer": "A"}, "persona", "unknown persona 'pirate'"),
        ({"persona": "student", "question": "Q?", "answer": "A", "context": 3}, "context", "must be a string"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path: Path, pack: Any, row: dict[str, Any], field: str,
                                           message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(DataError) as info:
        load_qa(path, pack)
    text = str(info.value)
    assert "bad.jsonl:2" in text and repr(field) in text and message in text


def test_bad_files(tmp_path: Path, pack: Any) -> None:
    with pytest.raises(DataError, match="no such data file"):
        load_qa(tmp_path / "missing.jsonl", pack)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"persona": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl:1: invalid JSON"):
        load_qa(broken, pack)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="contains no rows"):
        load_qa(empty, pack)
    other = tmp_path / "data.xml"
    other.write_text("<x/>", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type"):
        load_qa(other, pack)


def test_real_webscale_library_rows(shared_data: Path, pack: Any) -> None:
    path = shared_data / "webscale_rl_library" / "education.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    loaded = load_qa(path, pack)
    assert loaded.report.rows == 5
    assert loaded.report.kept + loaded.report.unmapped_rows == 5
    assert all(r.context for r in loaded.records)


def test_csv_from_a_spreadsheet_and_csv_mistakes_are_named(tmp_path: Path) -> None:
    from persona_router.core.rows import iter_rows

    bom = tmp_path / "excel.csv"
    bom.write_bytes("\ufeffpersona,question,answer\nstudent,\"what is\na fraction?\",a part\nclinician,q2,a2\n"
                    .encode("utf-8"))
    rows = list(iter_rows(bom))
    assert rows[0][1]["persona"] == "student" and rows[0][0].endswith("excel.csv:3")  # ends on line 3
    assert rows[1][0].endswith("excel.csv:4")  # the line after the quoted newline, not row count + 1
    unquoted = tmp_path / "comma.csv"
    unquoted.write_text("persona,question,answer\nclinician,what is 1,2 dose?,take 2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"comma.csv:2.*4 fields where the header has 3; quote"):
        list(iter_rows(unquoted))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("persona,question,answer\nstudent,caf\xe9?,oui\n".encode("cp1252"))
    with pytest.raises(DataError, match=r"latin\.csv.*not UTF-8 text"):
        list(iter_rows(latin))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet.*not a readable Parquet file"):
        list(iter_rows(broken))


def test_csv_headers_long_fields_and_boms(tmp_path: Path) -> None:
    from persona_router.core.rows import iter_rows

    twice = tmp_path / "twice.csv"
    twice.write_text("persona,question,answer,answer\nstudent,Q?,real answer,stray note\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"twice\.csv:1.*'answer' more than once"):
        list(iter_rows(twice))  # DictReader kept the last: the stray note would have been trained on
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("persona ,question, answer\nstudent,Q?,A\n", encoding="utf-8")
    assert next(iter(iter_rows(spaced)))[1] == {"persona": "student", "question": "Q?", "answer": "A"}
    long = tmp_path / "long.csv"
    context = "word " * 30_000  # 150,000 characters: past the csv module's default field limit
    long.write_text(f'persona,question,answer,context\nstudent,Q?,A,"{context}"\n', encoding="utf-8")
    assert next(iter(iter_rows(long)))[1]["context"] == context
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode("utf-8") + b"\n")
    assert next(iter(iter_rows(bom)))[1]["persona"] == "student"


def test_a_row_of_ours_with_an_extra_webscale_column_keeps_its_context(tmp_path: Path, pack: Any) -> None:
    rows = [{**ROWS[1], "pretrain_text": None}, {**ROWS[0], "context": None, "pretrain_text": "doc"}]
    loaded = load_qa(write_jsonl(tmp_path / "ours.jsonl", rows), pack)
    assert [r.context for r in loaded.records] == ["Label says 10 mg.", None]
    unknown = [{"persona": "pirates", "question": "Q?", "answer": "A", "context": None, "pretrain_text": "doc"}]
    with pytest.raises(DataError, match="unknown persona 'pirates'"):  # strict, not mapped and dropped
        load_qa(write_jsonl(tmp_path / "unknown.jsonl", unknown), pack)


def test_parquet_is_read_in_batches_with_row_numbers(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from persona_router.core.rows import iter_rows

    path = tmp_path / "many.parquet"
    pq.write_table(pa.Table.from_pylist([{"persona": "student", "question": f"Q{i}?", "answer": "A"}
                                         for i in range(2500)]), path, row_group_size=700)
    rows = list(iter_rows(path))
    assert len(rows) == 2500 and rows[-1][0].endswith("[row 2499]") and rows[-1][1]["question"] == "Q2499?"


def test_a_missing_local_file_is_not_looked_up_on_the_hub(tmp_path: Path, pack: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from persona_router.training import loading

    def no_hub(name: str, *, split: str) -> Any:
        raise AssertionError(f"looked up {name!r} on the hub")

    monkeypatch.setattr(loading, "_iter_hub_rows", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for missing in ("DATA.JSONL", "data/train.txt"):  # relative, as typed: an upper-case suffix, a local folder
        with pytest.raises(DataError, match="no such data file"):
            load_qa(missing, pack)


def test_an_empty_routing_file_is_an_error(tmp_path: Path, pack: Any) -> None:
    from persona_router.router.fitting import load_routing_records

    header_only = tmp_path / "routes.csv"
    header_only.write_text("persona,question\n", encoding="utf-8")
    with pytest.raises(DataError, match="contains no rows"):
        load_routing_records([header_only], pack)
