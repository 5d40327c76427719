"""The report and the command say how many pairs each metric rests on, at which confidence level, and over how
many tested metrics the p-values are uncorrected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from persona_router.eval import report
from persona_router.eval.stats import StatsConfig, compare_paired, not_compared

CONFIG = StatsConfig(n_boot=500, seed=0)
METRICS = [{"name": name, "direction": "higher", "description": "", "legacy": False}
           for name in ("full", "gappy", "grouped", "latency_s", "empty")]


def _comparisons(config: StatsConfig = CONFIG) -> list[dict[str, Any]]:
    full = compare_paired("full", [2.0, 3.0, 1.5, 2.5, 4.0, 3.5], [1.0] * 6, config=config)
    gappy = compare_paired("gappy", [2.0, 3.0, None, 2.5, None, 3.5, 1.0, 2.0], [1.0] * 7 + [None], config=config)
    grouped = compare_paired("grouped", [2.0] * 6, [1.0] * 6, config=config,
                             groups=["q1", "q1", "q2", "q2", "q3", "q3"])
    latency = not_compared("latency_s", "lower", "batched")
    empty = compare_paired("empty", [None, None], [1.0, 1.0], config=config)
    return [c.to_json() for c in (full, gappy, grouped, latency, empty)]


def _rows(lines: list[str]) -> dict[str, list[str]]:
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_the_table_shows_n_and_the_pairs_dropped_for_each_metric() -> None:
    lines = report.comparison_table(_comparisons(), ("A", "B"), legacy=False, metrics=METRICS)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[2] == "n" and header[9] == "dropped"
    rows = _rows(lines)
    assert rows["full"][2] == "6" and rows["full"][9] == "0"
    assert rows["gappy"][2] == "5" and rows["gappy"][9] == "3 (A missing 2, B missing 1)"
    assert rows["grouped"][2] == "3 (6 items)"
    assert rows["latency_s"][2] == "0" and rows["latency_s"][9] == "0"
    assert rows["empty"][2] == "0" and rows["empty"][9] == "2 (A missing 2, B missing 0)"
    before = {k: v for k, v in _comparisons()[0].items() if k not in ("n_dropped", "missing_a", "missing_b")}
    assert _rows(report.comparison_table([before], ("A", "B"), legacy=False, metrics=METRICS))["full"][9] == "n/a"


def test_the_table_header_and_the_plot_title_carry_the_configured_confidence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ninety = _comparisons(StatsConfig(n_boot=500, seed=0, confidence=0.9))
    assert "A - B [90% CI]" in report.comparison_table(ninety, ("A", "B"), legacy=False, metrics=METRICS,
                                                       confidence=0.9)[0]
    assert "[95% CI]" in report.comparison_table(ninety, ("A", "B"), legacy=False, metrics=METRICS)[0]
    titles: list[str] = []

    def keep_title(fig: Any, path: Path) -> Path:
        titles.append(fig.axes[0].get_title())
        import matplotlib.pyplot as plt

        plt.close(fig)
        return path

    monkeypatch.setattr(report, "_save", keep_title)
    report.plot_differences([c for c in ninety if c["n"]], ("A", "B"), tmp_path / "p.png", confidence=0.9)
    assert "90% bootstrap CI" in titles[0] and "95%" not in titles[0]


def test_only_tested_metrics_count_towards_the_uncorrected_family() -> None:
    assert report.tested_metrics(_comparisons()) == ["full", "gappy", "grouped"]


def test_eval_ab_says_how_many_metrics_were_tested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from persona_router.adapters import base_model
    from persona_router.cli.main import build_parser
    from persona_router.eval import pipeline

    monkeypatch.setattr(pipeline, "run_ab", lambda *args, **kwargs: {"comparisons": _comparisons()})
    monkeypatch.setattr(report, "write_report", lambda *args, **kwargs: [])
    monkeypatch.setattr(base_model, "configure_threads", lambda *args, **kwargs: 1)
    args = build_parser().parse_args(["eval", "ab", "--persona", "student", "--a", "prompt", "--b", "base",
                                      "--out", str(tmp_path)])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "not corrected for the 3 metrics tested" in out


def test_plots_are_readable_like_the_reports_beside_them(tmp_path: Path) -> None:
    """A plot is written through a private temp file (0600); it must land with the mode report.md gets."""
    import os

    from persona_router.core.atomic import default_mode

    comparisons = _comparisons(StatsConfig(n_boot=200, seed=0))
    path = report.plot_differences([c for c in comparisons if c["n"]], ("A", "B"), tmp_path / "p.png")
    assert os.stat(path).st_mode & 0o777 == default_mode(folder=False)


def test_eval_options_are_checked_before_the_run_and_named_as_typed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from persona_router.cli.main import main
    from persona_router.eval import pipeline

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the run started before its options were checked")

    monkeypatch.setattr(pipeline, "run_ab", must_not_run)
    monkeypatch.setattr(pipeline, "run_matrix", must_not_run)
    a_file = tmp_path / "report.txt"
    a_file.write_text("x", encoding="utf-8")
    base = ["eval", "ab", "--persona", "student", "--a", "prompt", "--b", "base"]
    assert main([*base, "--out", str(a_file)]) == 2
    assert "field '--out'" in capsys.readouterr().err
    assert main(["eval", "matrix", "--out", str(a_file)]) == 2
    assert "field '--out'" in capsys.readouterr().err
    assert main([*base, "--bootstrap", "50", "--out", str(tmp_path / "r")]) == 2
    assert "field '--bootstrap'" in capsys.readouterr().err
    assert main([*base, "--max-context-chars", "-1", "--out", str(tmp_path / "r")]) == 2
    assert "field '--max-context-chars'" in capsys.readouterr().err
