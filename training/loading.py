"""Load question/answer data: JSONL, JSON, CSV and Parquet files, or a hub dataset by name.

Rows in our schema (``persona, question, answer, context?, domain?``) must name a persona of the pack:
anything else is an error naming the file, row and field. Rows in the Webscale-RL schema
(``pretrain_text, domain, persona, question, answer``, or the pipeline's ``original_material``) carry
free-text audiences; a ``PersonaMapping`` maps them and the rows it cannot map are counted in the report.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_router.core.errors import DataError
from persona_router.core.pack import PersonaPack
from persona_router.core.records import QARecord, qa_from_row
from persona_router.core.rows import FILE_FORMATS, iter_rows
from persona_router.training.persona_mapping import PersonaMapping

log = logging.getLogger(__name__)

WEBSCALE_CONTEXT_KEYS = ("pretrain_text", "original_material")


@dataclass
class LoadReport:
    source: str
    rows: int = 0
    kept: int = 0
    mapped_exact: int = 0
    mapped_similarity: int = 0
    unmapped: Counter[str] = field(default_factory=Counter)

    @property
    def unmapped_rows(self) -> int:
        return sum(self.unmapped.values())

    def summary(self) -> str:
        text = f"{self.source}: {self.rows} rows, {self.kept} kept"
        if self.unmapped:
            top = ", ".join(f"{label!r} x{n}" for label, n in self.unmapped.most_common(5))
            text += f", {self.unmapped_rows} unmapped (e.g. {top})"
        return text

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "kept": self.kept, "mapped_exact": self.mapped_exact,
                "mapped_similarity": self.mapped_similarity, "unmapped_rows": self.unmapped_rows,
                "unmapped_labels": dict(self.unmapped)}


@dataclass
class LoadedQA:
    records: list[QARecord]
    report: LoadReport


def load_qa(source: str | Path, pack: PersonaPack, *, mapping: PersonaMapping | None = None,
            split: str = "train") -> LoadedQA:
    """Load QA records from a file or hub dataset, validated against ``pack``."""
    report = LoadReport(source=str(source))
    records: list[QARecord] = []
    for where, row in iter_source_rows(source, split=split):
        report.rows += 1
        if is_webscale_row(row):
            record = _webscale_record(row, where=where, mapping=mapping or PersonaMapping.from_pack(pack),
                                      report=report)
            if record is None:
                continue
        else:
            record = qa_from_row(row, where=where)
            if record.persona not in pack:
                raise DataError(f"unknown persona {record.persona!r}; valid personas: {', '.join(sorted(pack.names))}",
                                path=where, field="persona")
        records.append(record)
        report.kept += 1
    if report.rows == 0:
        raise DataError("contains no rows", path=str(source))
    if report.unmapped:
        log.warning("%s", report.summary())
    return LoadedQA(records=records, report=report)


def is_webscale_row(row: dict[str, Any]) -> bool:
    """A Webscale-RL row: one of its context columns and no ``context`` of ours. A row of our schema that
    merely carries such a column keeps its own context and the strict persona check."""
    return "context" not in row and any(key in row for key in WEBSCALE_CONTEXT_KEYS)


def _webscale_record(row: dict[str, Any], *, where: str, mapping: PersonaMapping,
                     report: LoadReport) -> QARecord | None:
    label = row.get("persona")
    if not isinstance(label, str) or not label.strip():
        raise DataError("must be a non-empty string", path=where, field="persona")
    persona, how = mapping.map_label(label)
    if persona is None:
        report.unmapped[label.strip()] += 1
        return None
    if how == "exact":
        report.mapped_exact += 1
    else:
        report.mapped_similarity += 1
    context = next((row[k] for k in WEBSCALE_CONTEXT_KEYS if isinstance(row.get(k), str)), None)
    return qa_from_row({**row, "persona": persona, "context": context}, where=where)


def iter_source_rows(source: str | Path, *, split: str = "train") -> Iterator[tuple[str, dict[str, Any]]]:
    path = Path(source)
    if path.is_file():
        yield from iter_rows(path)
        return
    if _looks_local(path, str(source)):
        raise DataError("no such data file", path=str(source))
    yield from _iter_hub_rows(str(source), split=split)


def _looks_local(path: Path, source: str) -> bool:
    """A name meant as a local file (a missing one must not become a slow hub lookup): a data file's suffix in
    any case, a path that exists, one starting with '.', '/' or '~', or one inside a folder that exists here."""
    return (path.suffix.lower() in FILE_FORMATS or path.exists() or source.startswith((".", "/", "~"))
            or (len(path.parts) > 1 and path.parent.is_dir()))


def _iter_hub_rows(name: str, *, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError("hub datasets need the datasets package: pip install datasets") from exc
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(f"could not load hub dataset {name!r} split {split!r} ({type(exc).__name__}: {exc})",
                        path=name) from exc
    for number, row in enumerate(dataset):
        yield f"{name}[{split}][{number}]", dict(row)
