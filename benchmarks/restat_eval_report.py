"""Recompute the paired statistics of a saved ``eval ab`` / ``eval matrix`` report from its per-item metrics.

When the statistics change (the bootstrap moved from a hand-written percentile interval to scipy's BCa; the
matrix's unit became the parallel question; a verdict needs the ranks to agree with the mean), committed
reports follow without generating the answers again: answers, judge scores and every per-item
metric stay exactly as measured; only ``comparisons`` (and the report's markdown and plots) are rebuilt,
and ``meta.restat`` records when and why. Prints each metric's old and new interval.

    python benchmarks/restat_eval_report.py benchmarks/results/eval_ab_clinician benchmarks/results/eval_matrix
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from persona_router.eval.pipeline import BATCHED_LATENCY, compare_all
from persona_router.eval.report import write_report
from persona_router.eval.stats import StatsConfig

ARMS = {"ab": ("A", "B"), "matrix": ("adapter", "prompt")}


def restat(folder: Path, note: str) -> list[dict[str, Any]]:
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    config = report["meta"]["config"]
    stats = StatsConfig(n_boot=config["n_boot"], confidence=config["confidence"], alpha=config["alpha"],
                        seed=config["seed"])
    a, b = ARMS[report["kind"]]
    rows = [item for item in report["items"] if a in item and b in item]
    groups = [_question(row) for row in rows] if report["kind"] == "matrix" else None
    skip = {"latency_s": BATCHED_LATENCY} if config.get("engine") == "batched" else None
    comparisons = [c.to_json() for c in compare_all([r[a]["metrics"] for r in rows], [r[b]["metrics"] for r in rows],
                                                    stats=stats, labels=(a, b), groups=groups, skip=skip)]
    old = {c["metric"]: c for c in report["comparisons"]}
    changes = [{"metric": c["metric"], "old_ci": [old[c["metric"]]["ci_low"], old[c["metric"]]["ci_high"]],
                "new_ci": [c["ci_low"], c["ci_high"]], "old_verdict": old[c["metric"]]["verdict"],
                "new_verdict": c["verdict"]} for c in comparisons]
    report["comparisons"] = comparisons
    if report["kind"] == "matrix":  # older reports lack the item count and counted own questions as one
        report["n_items"] = len(report["items"])
        report["n_questions"] = len({_question(row) for row in report["items"]})
    _restore_order(report)
    report["meta"]["restat"] = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "note": note}
    write_report(report, folder)
    return changes


def _question(row: dict[str, Any]) -> str:
    """A matrix row's question: its ``parallel_id`` (older reports: the ``PARALLEL_ID:persona`` item id)."""
    if row.get("parallel_id"):
        return str(row["parallel_id"])
    question, _, persona = str(row["id"]).rpartition(":")
    return question if question and persona == row["persona"] else str(row["id"])


def _restore_order(report: dict[str, Any]) -> None:
    """report.json is written with sorted keys; put back the order the markdown was first rendered in."""
    def ordered(mapping: dict[str, Any], first: list[str]) -> dict[str, Any]:
        return {**{k: mapping[k] for k in first if k in mapping}, **mapping}

    versions = report["meta"].get("versions", {})
    report["meta"]["versions"] = ordered(versions, ["torch", "transformers", "peft"])
    if report["kind"] == "matrix":
        report["conditions"] = ordered(report["conditions"], ["prompt", "adapter"])
        report["adapters"] = ordered(report["adapters"], report["personas"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--note", default="comparisons recomputed from the stored per-item metrics (BCa bootstrap; "
                        "matrix unit: the parallel question; verdicts need the ranks to agree with the mean; "
                        "latency_s not compared for the batched engine); answers and per-item metrics unchanged")
    args = parser.parse_args()
    for folder in args.folders:
        for change in restat(folder, args.note):
            old_ci, new_ci = (_interval(*change[k]) for k in ("old_ci", "new_ci"))
            before, after = (change[k].split(" (")[0] for k in ("old_verdict", "new_verdict"))
            verdict = "" if before == after else f"; verdict {before!r} -> {after!r}"
            print(f"{folder} {change['metric']}: CI {old_ci} -> {new_ci}{verdict}")


def _interval(low: float | None, high: float | None) -> str:
    return "n/a" if low is None or high is None else f"[{low:+.4g}, {high:+.4g}]"


if __name__ == "__main__":
    main()
