"""Write an evaluation report: ``report.json`` (every number), ``report.md`` (for people), PNG plots.

Plots: ``paired_differences.png`` (mean paired difference per metric with its bootstrap CI), the judge's
held-out ``confusion_judge_heldout.png``, and for ``eval matrix`` one confusion matrix per condition
(``confusion_prompt.png``, ``confusion_adapter.png``). Every file is written to a temp name and renamed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from persona_router.core.atomic import TMP_PREFIX, atomic_write_json, atomic_write_text, default_mode
from persona_router.eval.stats import confidence_percent


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json", out / "report.md"]
    plots = _plots(report, out)
    report = {**report, "files": [p.name for p in written + plots]}
    atomic_write_json(out / "report.json", report)
    markdown = ab_markdown(report) if report["kind"] == "ab" else matrix_markdown(report)
    atomic_write_text(out / "report.md", markdown)
    return written + plots


# --- markdown -------------------------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def tested_metrics(comparisons: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics a test ran on (a p-value; descriptive and legacy metrics included, since their "higher"
    verdicts are tests too): the family that uncorrected p-values are multiple over. A metric not compared
    on purpose (``latency_s`` in a batched run) or without paired values has no p-value and is not counted."""
    return [c["metric"] for c in comparisons if c.get("test_p", c.get("wilcoxon_p")) is not None]


def _confidence(report: dict[str, Any]) -> float:
    return float(report["meta"]["config"].get("confidence", 0.95))


def comparison_table(comparisons: Sequence[dict[str, Any]], labels: tuple[str, str], *, legacy: bool,
                     metrics: Sequence[dict[str, Any]], confidence: float = 0.95) -> list[str]:
    """One row per metric. The verdict column keeps only the verdict's words, so ``n`` and the pairs dropped
    for a missing value have columns of their own: a metric on fewer pairs than the others shows it."""
    is_legacy = {m["name"]: m["legacy"] for m in metrics}
    a, b = labels
    lines = [f"| metric | better | n | {a} mean | {b} mean | {a} - {b} [{confidence_percent(confidence)} CI] | "
             "W/T/L | sign p | test p | dropped | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        if is_legacy.get(c["metric"], False) != legacy:
            continue
        ci = f"{_fmt(c['mean_diff'])} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]" if c["n"] else "n/a"
        verdict = c["verdict"].split(" (")[0].split(": ", 1)[-1]
        lines.append(f"| {c['metric']} | {c['direction']} | {_units(c)} | {_fmt(c['mean_a'])} | {_fmt(c['mean_b'])} | "
                     f"{ci} | {c['wins']}/{c['ties']}/{c['losses']} | {_fmt(c['sign_p'])} | {_test_p(c)} | "
                     f"{_dropped(c, labels)} | {verdict} |")
    return lines


def _units(comparison: dict[str, Any]) -> str:
    """n: independent units, and the items behind them when units are groups of items."""
    units, items = comparison["n"], comparison.get("n_items", comparison["n"])
    return str(units) if units == items or not units else f"{units} ({items} items)"


def _dropped(comparison: dict[str, Any], labels: tuple[str, str]) -> str:
    """Pairs left out for a missing value, and whose; "n/a" for reports from before they were counted."""
    if "n_dropped" not in comparison:
        return "n/a"
    if not comparison["n_dropped"]:
        return "0"
    return (f"{comparison['n_dropped']} ({labels[0]} missing {comparison['missing_a']}, "
            f"{labels[1]} missing {comparison['missing_b']})")


def _test_p(comparison: dict[str, Any]) -> str:
    """The verdict's test p-value and its name (reports from before ``test`` was recorded: Wilcoxon)."""
    name = comparison.get("test") or "Wilcoxon"
    p = comparison.get("test_p", comparison["wilcoxon_p"])
    return f"{_fmt(p)} ({name})" if p is not None else "-"


def judge_lines(judge: dict[str, Any]) -> list[str]:
    held = judge["heldout"]
    lines = ["## Style judge", "",
             f"Logistic regression on {judge['feature_set']} features ({judge['embedder']}), fitted on "
             f"{judge['train_size']} TRAIN reference answers of {len(judge['classes'])} personas "
             f"({', '.join(judge['classes'])}); never on evaluated items "
             f"(training answers left out because they are evaluated: {judge['excluded_overlap']}).", ""]
    if judge.get("cv_accuracy"):
        cv = ", ".join(f"{k} {v:.3f}" for k, v in judge["cv_accuracy"].items())
        lines += [f"- 5-fold CV accuracy on train, by feature set: {cv}"]
    if held.get("status") == "ok":
        lines += [f"- held-out accuracy on the TEST split's reference answers: **{held['accuracy']:.3f}** "
                  f"(n={held['n']})"]
    else:
        lines += [f"- held-out accuracy: skipped ({held.get('reason')})"]
    coch = judge["cochrane"]
    if coch.get("status") == "ok":
        lines += [f"- Cochrane check ({coch['pairs']} technical/plain-language pairs never seen): "
                  f"P(clinician|technical) > P(clinician|plain) in **{coch['pair_order_accuracy']:.3f}** of pairs; "
                  f"accuracy restricted to clinician vs general-reader **{coch['two_class_accuracy']:.3f}** "
                  f"(technical -> clinician {coch['source_as_technical']:.3f}, plain -> general-reader "
                  f"{coch['target_as_lay']:.3f}); top class of technical paragraphs {coch['top_class_source']}, "
                  f"of plain summaries {coch['top_class_target']}"]
    else:
        lines += [f"- Cochrane check: skipped ({coch.get('reason')})"]
    return [*lines, ""]


def _meta_lines(report: dict[str, Any]) -> list[str]:
    meta = report["meta"]
    config = meta["config"]
    return [f"- base: `{meta['base_name']}` ({meta['base_fingerprint'][:19]}...) on {meta['device']} at "
            f"{meta['precision']}; {meta['platform']}, {meta['cpu_count']} CPUs",
            f"- decoding: max_new_tokens={config['max_new_tokens']}, temperature={config['temperature']}, "
            f"top_p={config['top_p']}, seed={config['seed']} (same per-item seeds for every arm)",
            f"- data: {config['data']}; judge and readability ranges from: {config['train_data']}",
            f"- statistics: {config['n_boot']} bootstrap resamples (seeded), "
            f"{confidence_percent(config['confidence'])} CI, alpha={config['alpha']}, p-values not corrected for "
            f"the {len(tested_metrics(report['comparisons']))} metrics tested; a verdict needs the CI to "
            "exclude 0 and the test p < alpha" + (
                "; unit: one question (the personas' answers to a parallel question are one unit): cluster "
                "bootstrap CI of the mean over answers, cluster sign-flip permutation test, W/T/L and sign test "
                "over questions" if any(c.get("test") == "cluster sign-flip" for c in report["comparisons"]) else
                "; unit: one item; test: Wilcoxon signed-rank, its ranks agreeing with the mean"),
            f"- created {meta['created_at']}; versions {meta['versions']}", ""]


def _legacy_lines(report: dict[str, Any], labels: tuple[str, str]) -> list[str]:
    return ["## Legacy metrics (the original notebook's, for side-by-side comparison only)", "",
            "The notebook published 67.0% 'persona-style hit rate' and 51.7% 'semantic overlap'. The hit rate is a "
            "keyword substring test that almost any long English answer passes, with no comparison against other "
            "personas; the overlap is the Jaccard index of the two texts' sets of distinct characters, which is high "
            "for any two English paragraphs. Neither measures persona adaptation.", "",
            *comparison_table(report["comparisons"], labels, legacy=True, metrics=report["metrics"],
                              confidence=_confidence(report)), ""]


def ab_markdown(report: dict[str, Any]) -> str:
    arms = report["arms"]
    lines = [f"# A/B evaluation: persona `{report['persona']}`", "",
             f"- A: `{arms['A']['spec']}` ({arms['A']['kind']}; system prompt: {arms['A']['system_prompt']})",
             f"- B: `{arms['B']['spec']}` ({arms['B']['kind']}; system prompt: {arms['B']['system_prompt']})",
             f"- items: {report['n_items']}", *_meta_lines(report), "## Results", "",
             *comparison_table(report["comparisons"], ("A", "B"), legacy=False, metrics=report["metrics"],
                               confidence=_confidence(report)), "",
             "Verdicts:", "", *[f"- {c['verdict']}" for c in report["comparisons"]], "",
             *_legacy_lines(report, ("A", "B")), *judge_lines(report["judge"]), "## Sample answers", ""]
    for item in report["items"][:3]:
        lines += [f"**{item['id']}**: {item['question']}", "", f"- A: {_clip(item['A']['text'])}",
                  f"- B: {_clip(item['B']['text'])}", f"- reference: {_reference(item)}", ""]
    return "\n".join(lines) + "\n"


def _reference(item: dict[str, Any]) -> str:
    if "reference" in item:
        return _clip(item["reference"])
    # A report whose references were withheld (licensed text) keeps only their hash.
    return f"(not stored in this report; sha256 {str(item.get('reference_sha256', '?'))[:16]}...)"


def matrix_markdown(report: dict[str, Any]) -> str:
    lines = ["# Persona matrix: does each adapter sound like its persona?", "",
             f"- {report['n_questions']} questions, {report['n_items']} items, {len(report['personas'])} personas"
             + (f" (items: {report['items_kind']}; a parallel question is asked of every persona)"
                if "items_kind" in report else ""),
             "- persona system prompt: " + ("given to both arms" if report.get("system_prompt", True) else
                                            "withheld (baseline = the bare base; adapters carry the style alone)"),
             "- adapters: " + (", ".join(f"{p}: {a['spec']}" for p, a in report["adapters"].items()) or "none")]
    for persona, reason in report["missing_adapters"].items():
        lines.append(f"- no adapter for {persona}: {reason}")
    lines += _meta_lines(report)
    for name, condition in report["conditions"].items():
        lines += [f"## Judge confusion: {name}", "",
                  f"Rows: the persona asked for; columns: the judge's top persona. Accuracy "
                  f"**{condition['accuracy']:.3f}**, mean P(asked persona) {_fmt(condition['mean_adherence'])}, "
                  f"n={condition['n']}.", "", *confusion_table(condition["classes"], condition["confusion"]), ""]
    if report["comparisons"]:
        lines += ["## Adapter vs prompt baseline (paired over the same questions)", "",
                  *comparison_table(report["comparisons"], ("adapter", "prompt"), legacy=False,
                                    metrics=report["metrics"], confidence=_confidence(report)), "",
                  *_legacy_lines(report, ("adapter", "prompt"))]
    lines += judge_lines(report["judge"])
    return "\n".join(lines) + "\n"


def confusion_table(classes: Sequence[str], matrix: Sequence[Sequence[int]]) -> list[str]:
    lines = ["| asked \\ judged | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(classes, matrix, strict=True)]
    return lines


def _clip(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


# --- plots ----------------------------------------------------------------------------------------------------

def _plots(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    paths = []
    labels = ("A", "B") if report["kind"] == "ab" else ("adapter", "prompt")
    comparisons = [c for c in report["comparisons"] if c["n"]]
    if comparisons:
        paths.append(plot_differences(comparisons, labels, out / "paired_differences.png",
                                      confidence=_confidence(report)))
    held = report["judge"]["heldout"]
    if held.get("status") == "ok":
        paths.append(plot_confusion(held["classes"], held["confusion"], "judge on held-out reference answers",
                                    out / "confusion_judge_heldout.png"))
    for name, condition in report.get("conditions", {}).items():
        title = f"{name}: judge accuracy {condition['accuracy']:.2f}"
        paths.append(plot_confusion(condition["classes"], condition["confusion"], title, out / f"confusion_{name}.png"))
    return paths


def plot_differences(comparisons: Sequence[dict[str, Any]], labels: tuple[str, str], path: Path, *,
                     confidence: float = 0.95) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(comparisons), 1, figsize=(7, 0.9 * len(comparisons) + 1.0), squeeze=False)
    for ax, c in zip(axes[:, 0], comparisons, strict=True):
        low, high = c["ci_low"], c["ci_high"]
        ax.errorbar([c["mean_diff"]], [0], xerr=[[c["mean_diff"] - low], [high - c["mean_diff"]]], fmt="o",
                    color="tab:red" if (low > 0 or high < 0) else "tab:blue", capsize=4)
        ax.axvline(0.0, color="grey", linewidth=0.8)
        span = max(abs(low), abs(high)) * 1.3 or 1.0
        ax.set_xlim(-span, span)
        ax.set_yticks([0])
        legacy = " LEGACY" if c["metric"].startswith("legacy_") else ""
        ax.set_yticklabels([f"{c['metric']} ({c['direction']}){legacy}"])
        ax.tick_params(axis="x", labelsize=7)
    axes[0, 0].set_title(f"mean paired difference {labels[0]} - {labels[1]}, {confidence_percent(confidence)} "
                         "bootstrap CI (red: CI excludes 0)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(classes: Sequence[str], matrix: Sequence[Sequence[int]], title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(classes) + 2.5, 1.0 * len(classes) + 2.0))
    ax.imshow(data, cmap="Blues")
    for (i, j), value in np.ndenumerate(data):
        ax.text(j, i, str(int(value)), ha="center", va="center",
                color="white" if value > data.max() / 2 else "black")
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)))
    ax.set_yticklabels(classes)
    ax.set_xlabel("judged persona")
    ax.set_ylabel("asked persona")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.chmod(tmp, default_mode(folder=False))  # mkstemp's 0600, where the JSON and markdown beside it are not
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
