"""Reading rows: JSONL, JSON, CSV and Parquet files (each row with its ``file:line``), and the demo dataset
that ships with the package (QA records and routing utterances, ``core/demo_data``)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from persona_router.core.errors import DataError
from persona_router.core.records import QARecord, RoutingRecord, qa_from_row, routing_from_row

FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")
DEMO_SPLITS = ("train", "test")


def iter_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (``file:line``, row) pairs from a JSONL, JSON, CSV or Parquet file; a file that is not UTF-8
    text is a DataError naming it."""
    try:
        yield from _iter_rows(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8", path=path) from exc


# utf-8-sig everywhere: a byte-order mark (spreadsheets and some editors write one) is not part of the data.
_ENCODING = "utf-8-sig"


def _iter_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding=_ENCODING) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"invalid JSON ({exc.msg})", path=f"{path}:{number}") from exc
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding=_ENCODING))
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON ({exc.msg})", path=path) from exc
        if not isinstance(rows, list):
            raise DataError("a .json data file must hold a list of objects", path=path)
        for number, row in enumerate(rows):
            yield f"{path}[{number}]", row
    elif suffix == ".csv":
        yield from _iter_csv(path)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise DataError(f"unsupported file type {suffix!r}; valid: {', '.join(FILE_FORMATS)}", path=path)


def _iter_csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    # Long contexts are normal here: the csv module's default limit (131,072 characters a field) is not.
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    with open(path, encoding=_ENCODING, newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            reader.fieldnames = _header(reader.fieldnames, path)
            for row in reader:
                where = f"{path}:{reader.line_num}"  # the line the row ends on, right after quoted newlines too
                if None in row:  # more fields than the header: an unquoted comma would shift the columns
                    raise DataError(f"{len(reader.fieldnames or []) + len(row[None])} fields where the header has "
                                    f"{len(reader.fieldnames or [])}; quote fields that contain a comma", path=where)
                yield where, {k: (v if v != "" else None) for k, v in row.items()}
        except csv.Error as exc:
            raise DataError(f"is not readable CSV ({exc})", path=f"{path}:{reader.line_num}") from exc


_CSV_FIELD_LIMIT = 2**31 - 1  # the largest the C long behind csv.field_size_limit takes on every platform


def _header(names: Sequence[str] | None, path: Path) -> list[str]:
    """The header's column names without surrounding spaces ("persona ,question" is a common export); a name
    given twice is refused, since one column's values would silently replace the other's."""
    if names is None:
        return []
    stripped = [name.strip() for name in names]
    repeated = sorted({name for name in stripped if stripped.count(name) > 1})
    if repeated:
        raise DataError(f"the header names column(s) {', '.join(map(repr, repeated))} more than once; give each "
                        "column its own name", path=f"{path}:1")
    return stripped


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError("reading Parquet needs pyarrow: pip install pyarrow", path=path) from exc
    try:
        parquet = pq.ParquetFile(path)
        # A batch at a time: a whole table plus its Python copy can be several times the file's text in memory.
        batches = parquet.iter_batches(batch_size=1024)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path}[row {number}]", row
                number += 1
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(f"is not a readable Parquet file ({exc})", path=path) from exc


def demo_data_dir() -> Path:
    return Path(str(resources.files("persona_router.core") / "demo_data"))


def demo_qa(split: str) -> list[QARecord]:
    """The demo dataset's QA records for ``train`` or ``test`` (the test split is never trained on)."""
    if split not in DEMO_SPLITS:
        raise DataError(f"unknown split {split!r}; valid: {', '.join(DEMO_SPLITS)}", field="split")
    records: list[QARecord] = []
    for path in sorted(demo_data_dir().glob(f"*/qa_{split}.jsonl")):
        records.extend(qa_from_row(row, where=where) for where, row in iter_rows(path))
    return records


def demo_routing(split: str) -> list[RoutingRecord]:
    """Routing utterances: ``train`` from each persona's folder, ``test`` from a separately written file."""
    if split not in DEMO_SPLITS:
        raise DataError(f"unknown split {split!r}; valid: {', '.join(DEMO_SPLITS)}", field="split")
    paths = sorted(demo_data_dir().glob("*/routing_train.jsonl")) if split == "train" else [
        demo_data_dir() / "routing_test.jsonl"]
    return [routing_from_row(row, where=where) for path in paths for where, row in iter_rows(path)]
