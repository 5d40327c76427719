"""Every classifier kind fitted on the same embeddings, cross-validation and held-out numbers side by side
(``persona-router fit-router --compare``), and the markdown table of that comparison."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from persona_router.core.pack import PersonaPack
from persona_router.core.records import RoutingRecord
from persona_router.router.classifier import CLASSIFIER_KINDS
from persona_router.router.encoder import Encoder
from persona_router.router.fitting import (
    FitConfig,
    FitResult,
    RoutingReport,
    evaluate,
    fit_router,
    fmt_optional,
    training_set,
)


def compare_classifiers(pack: PersonaPack, train: Sequence[RoutingRecord], test: Sequence[RoutingRecord] | None, *,
                        encoder: Encoder, config: FitConfig) -> list[dict[str, Any]]:
    """Fit every classifier kind on the same embeddings; cross-validation and held-out numbers side by side."""
    data = training_set(pack, train, config)
    x = encoder.encode(data.texts)
    test_x = encoder.encode([r.question for r in test]) if test else None
    rows = []
    for kind in CLASSIFIER_KINDS:
        result = fit_router(pack, train, encoder=encoder, config=replace(config, classifier=kind), embeddings=x)
        row: dict[str, Any] = {"classifier": kind, "chosen": _chosen(result), "fit_seconds": round(result.seconds, 2)}
        if result.cv_report:
            row["cv"] = _summary(result.cv_report)
        if test and test_x is not None:
            row["held_out"] = _summary(evaluate(result.router, test, title="held-out", embeddings=test_x))
        rows.append(row)
    return rows


def _chosen(result: FitResult) -> str:
    return describe_classifier(result.router.info["classifier"]) + f", T={result.router.calibration.temperature:.3g}"


def describe_classifier(chosen: dict[str, Any]) -> str:
    """``C=1`` for logreg, ``k=10`` for knn, ``-`` for centroid (it has no hyper-parameter)."""
    return {"logreg": f"C={chosen['c']:g}", "knn": f"k={chosen['k']}"}.get(chosen["kind"], "-")


def _summary(report: RoutingReport) -> dict[str, float | None]:
    return {"macro_f1": report.macro_f1, "accuracy": report.accuracy, "coverage": report.coverage,
            "inferred_precision": report.inferred_precision, "argmax_macro_f1": report.argmax_macro_f1}


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| classifier | chosen by CV | CV macro-F1 (argmax) | CV macro-F1 | CV coverage | held-out macro-F1 "
             "(argmax) | held-out macro-F1 | held-out accuracy | held-out coverage | held-out precision of inferred |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cv, test = row.get("cv", {}), row.get("held_out", {})
        lines.append(f"| {row['classifier']} | {row['chosen']} | {fmt_optional(cv.get('argmax_macro_f1'))} | "
                     f"{fmt_optional(cv.get('macro_f1'))} | {fmt_optional(cv.get('coverage'))} | "
                     f"{fmt_optional(test.get('argmax_macro_f1'))} | {fmt_optional(test.get('macro_f1'))} | "
                     f"{fmt_optional(test.get('accuracy'))} | {fmt_optional(test.get('coverage'))} | "
                     f"{fmt_optional(test.get('inferred_precision'))} |")
    return "\n".join(lines) + "\n"
