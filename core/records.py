"""The typed records that training, routing and evaluation share.

``QARecord`` is one answered question in one persona's register; ``RoutingRecord`` is one utterance
labelled with the persona that asks it. Files are JSONL with these field names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from persona_router.core.errors import DataError

QA_REQUIRED = ("persona", "question", "answer")
QA_OPTIONAL = ("context", "domain", "id", "parallel_id")
ROUTING_REQUIRED = ("persona", "question")


@dataclass(frozen=True)
class QARecord:
    persona: str
    question: str
    answer: str
    context: str | None = None
    domain: str | None = None
    id: str | None = None
    parallel_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class RoutingRecord:
    persona: str
    question: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def qa_from_row(row: dict[str, Any], *, where: str) -> QARecord:
    """Validate one row of our own schema; ``where`` names the file and line for errors."""
    values = _required_strings(row, QA_REQUIRED, where=where)
    optional: dict[str, str | None] = {}
    for key in QA_OPTIONAL:
        value = row.get(key)
        if value is None or (isinstance(value, float) and value != value):  # NaN from CSV/Parquet
            optional[key] = None
        elif not isinstance(value, str):
            raise DataError(f"must be a string, got {type(value).__name__}", path=where, field=key)
        else:
            optional[key] = value.strip() or None
    return QARecord(persona=values["persona"], question=values["question"], answer=values["answer"],
                    context=optional["context"], domain=optional["domain"], id=optional["id"],
                    parallel_id=optional["parallel_id"])


def routing_from_row(row: dict[str, Any], *, where: str) -> RoutingRecord:
    return RoutingRecord(**_required_strings(row, ROUTING_REQUIRED, where=where))


def _required_strings(row: dict[str, Any], keys: tuple[str, ...], *, where: str) -> dict[str, str]:
    if not isinstance(row, dict):
        raise DataError("each row must be an object", path=where)
    out = {}
    for key in keys:
        value = row.get(key)
        if value is None:
            raise DataError("is missing", path=where, field=key)
        if not isinstance(value, str) or not value.strip():
            raise DataError("must be a non-empty string", path=where, field=key)
        out[key] = value.strip()
    return out

