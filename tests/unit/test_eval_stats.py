"""Paired statistics on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from persona_router.core.errors import ConfigError
from persona_router.eval.stats import (
    StatsConfig,
    bootstrap_ci,
    compare_paired,
    confidence_percent,
    sign_test,
    wilcoxon_test,
)

CONFIG = StatsConfig(n_boot=2000, seed=7)


def test_planted_difference_is_detected_and_covered() -> None:
    rng = np.random.default_rng(0)
    b = rng.normal(0.5, 0.1, size=60)
    a = b + 0.2 + rng.normal(0.0, 0.05, size=60)  # planted difference: +0.2
    result = compare_paired("m", a.tolist(), b.tolist(), direction="higher", config=CONFIG)
    assert result.ci_low is not None and result.ci_high is not None
    assert result.ci_low > 0  # CI excludes 0 ...
    assert result.ci_low <= 0.2 <= result.ci_high  # ... and covers the planted difference
    assert result.wilcoxon_p is not None and result.wilcoxon_p < 1e-6
    assert result.sign_p is not None and result.sign_p < 1e-6
    assert result.wins > 50 and result.losses < 5
    assert "A better" in result.verdict


def test_lower_is_better_flips_the_winner() -> None:
    b = np.linspace(1.0, 2.0, 40)
    a = b + 0.5
    result = compare_paired("latency_s", a.tolist(), b.tolist(), direction="lower", config=CONFIG)
    assert result.wins == 0 and result.losses == 40
    assert "B better" in result.verdict


def test_identical_arms_show_no_difference() -> None:
    values = np.random.default_rng(1).normal(size=30).tolist()
    result = compare_paired("m", values, values, config=CONFIG)
    assert result.mean_diff == 0.0
    assert (result.ci_low, result.ci_high) == (0.0, 0.0)
    assert result.ties == 30 and result.wins == result.losses == 0
    assert result.sign_p == 1.0 and result.wilcoxon_p == 1.0
    assert "no detectable difference" in result.verdict


def test_same_distribution_arms_are_not_significant() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=40), rng.normal(size=40)
    result = compare_paired("m", a.tolist(), b.tolist(), config=CONFIG)
    assert result.ci_low is not None and result.ci_high is not None
    assert result.ci_low < 0 < result.ci_high
    assert result.wilcoxon_p is not None and result.wilcoxon_p > 0.05
    assert "no detectable difference at n=40" in result.verdict


def test_bootstrap_is_deterministic_under_a_seed() -> None:
    diff = np.random.default_rng(3).normal(size=25)
    first = bootstrap_ci(diff, n_boot=500, confidence=0.95, seed=11)
    assert first == bootstrap_ci(diff, n_boot=500, confidence=0.95, seed=11)
    assert first != bootstrap_ci(diff, n_boot=500, confidence=0.95, seed=12)


def test_missing_values_drop_the_pair() -> None:
    result = compare_paired("m", [1.0, None, 3.0, float("nan")], [0.0, 1.0, None, 1.0], config=CONFIG)
    assert result.n == 1 and result.mean_diff == 1.0
    empty = compare_paired("m", [None], [1.0], config=CONFIG)
    assert empty.n == 0 and "no paired values" in empty.verdict


def test_dropped_pairs_are_counted_and_said() -> None:
    """A pair left out for a missing value is visible: counted per arm and named in the verdict."""
    result = compare_paired("m", [1.0, None, 3.0, float("nan"), None], [0.0, 1.0, None, 1.0, None], config=CONFIG)
    assert (result.n, result.n_dropped, result.missing_a, result.missing_b) == (1, 4, 3, 2)
    assert "n=1, 4 pairs dropped, value missing in A: 3, in B: 2" in result.verdict
    empty = compare_paired("m", [None, None], [1.0, 2.0], config=CONFIG, labels=("adapter", "prompt"))
    assert (empty.n_dropped, empty.missing_a, empty.missing_b) == (2, 2, 0)
    assert "no paired values (2 pairs dropped, value missing in adapter: 2, in prompt: 0)" in empty.verdict
    whole = compare_paired("m", [1.0] * 6, [0.0] * 6, config=CONFIG)
    assert whole.n_dropped == 0 and "dropped" not in whole.verdict


def test_empty_answers_count_against_their_arm_in_readability() -> None:
    """Arm A answers nothing on half the items (a broken adapter): readability_in_range keeps every pair and
    A loses them; readability_gap drops those pairs and says how many, and on which side."""
    from persona_router.eval.metrics import reference_range, text_metrics

    grade_range = reference_range(["The cat sat. The dog ran."])
    good = "The cat sat. The dog ran."
    rows_a = [text_metrics("" if k % 2 else good, "ref", "student", grade_range) for k in range(12)]
    rows_b = [text_metrics(good, "ref", "student", grade_range) for _ in range(12)]
    in_range = compare_paired("readability_in_range", [r["readability_in_range"] for r in rows_a],
                              [r["readability_in_range"] for r in rows_b], config=CONFIG)
    assert in_range.n == 12 and in_range.n_dropped == 0 and in_range.losses == 6
    assert in_range.mean_a == 0.5 and in_range.mean_b == 1.0 and "B better" in in_range.verdict
    gap = compare_paired("readability_gap", [r["readability_gap"] for r in rows_a],
                         [r["readability_gap"] for r in rows_b], direction="lower", config=CONFIG)
    assert (gap.n, gap.n_dropped, gap.missing_a, gap.missing_b) == (6, 6, 6, 0)


def test_the_confidence_level_is_the_configured_one() -> None:
    assert confidence_percent(0.95) == "95%" and confidence_percent(0.9) == "90%"
    assert confidence_percent(0.975) == "97.5%"
    a, b = [2.0, 3.0, 1.5, 2.5, 4.0, 3.5], [1.0] * 6
    assert "95% CI [" in compare_paired("m", a, b, config=CONFIG).verdict
    ninety = compare_paired("m", a, b, config=StatsConfig(n_boot=2000, seed=7, confidence=0.9))
    assert "90% CI [" in ninety.verdict and "95%" not in ninety.verdict


def test_exact_p_values() -> None:
    assert sign_test(0, 0) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 * 0.5**10)
    assert wilcoxon_test([0.0, 0.0]) == 1.0
    # n=6 all positive: exact two-sided p = 2 / 2**6
    assert wilcoxon_test([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == pytest.approx(2 / 64)


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(ConfigError, match="direction"):
        compare_paired("m", [1.0], [1.0], direction="up")
    with pytest.raises(ConfigError, match="equal lengths"):
        compare_paired("m", [1.0], [1.0, 2.0])
    with pytest.raises(ConfigError, match="n_boot"):
        StatsConfig(n_boot=5)


def test_bca_agrees_with_the_former_percentile_interval_on_symmetric_data() -> None:
    """scipy's BCa against the percentile bootstrap it replaced, on a symmetric sample (n=60): each end within
    10% of the interval's width (BCa corrects for skew; here there is little to correct)."""
    from tests.support.legacy_metrics import percentile_bootstrap_ci

    diff = np.random.default_rng(5).normal(0.1, 1.0, size=60)
    new = bootstrap_ci(diff, n_boot=5000, confidence=0.95, seed=0)
    old = percentile_bootstrap_ci(diff, n_boot=5000, confidence=0.95, seed=0)
    width = old[1] - old[0]
    assert abs(new[0] - old[0]) <= 0.1 * width and abs(new[1] - old[1]) <= 0.1 * width


def test_bca_leans_with_skewed_data_and_degenerate_samples_collapse() -> None:
    skewed = np.random.default_rng(6).exponential(1.0, size=15)
    low, high = bootstrap_ci(skewed, n_boot=5000, confidence=0.95, seed=0)
    mean = float(skewed.mean())
    assert low < mean < high and high - mean > mean - low  # a right-skewed mean has the longer upper tail
    assert bootstrap_ci([0.3], n_boot=500, confidence=0.95, seed=0) == (0.3, 0.3)
    assert bootstrap_ci([1.0] * 8, n_boot=500, confidence=0.95, seed=0) == (1.0, 1.0)
    binary = bootstrap_ci([0.0] * 9 + [1.0], n_boot=500, confidence=0.95, seed=0)  # BCa may be undefined here
    assert all(np.isfinite(binary)) and binary[0] <= 0.1 <= binary[1]


def test_grouped_items_are_one_unit_each() -> None:
    """Five personas' answers to three questions: three independent units, not fifteen."""
    rng = np.random.default_rng(4)
    per_question = [-1.43, -3.44, -3.54]
    b = rng.normal(8.0, 1.0, size=15)
    a = b + np.repeat(per_question, 5) + rng.normal(0.0, 0.3, size=15)
    groups = [f"q{k}" for k in range(3) for _ in range(5)]
    flat = compare_paired("grade", a.tolist(), b.tolist(), direction="none", config=CONFIG)
    grouped = compare_paired("grade", a.tolist(), b.tolist(), direction="none", config=CONFIG, groups=groups)
    assert flat.n == 15 and "B higher" in flat.verdict  # what counting answers as units would claim
    assert grouped.n == 3 and grouped.n_items == 15 and grouped.wins + grouped.ties + grouped.losses == 3
    assert grouped.mean_diff == pytest.approx(float(np.mean(a - b)))  # balanced groups: same mean
    assert "too few units" in grouped.verdict and "n=3 groups of 15 items" in grouped.verdict
    assert grouped.ci_low is not None and grouped.ci_high is not None and flat.ci_low is not None
    assert flat.ci_high is not None and grouped.ci_high - grouped.ci_low > flat.ci_high - flat.ci_low  # clustered
    singletons = compare_paired("grade", a.tolist(), b.tolist(), direction="none", config=CONFIG, groups=range(15))
    assert (singletons.ci_low, singletons.ci_high, singletons.n) == (flat.ci_low, flat.ci_high, 15)


def test_groups_must_match_the_items() -> None:
    with pytest.raises(ConfigError, match="group keys"):
        compare_paired("m", [1.0, 2.0], [1.0, 2.0], groups=["q1"])


def test_no_winner_when_the_mean_and_the_ranks_disagree() -> None:
    """Most items favour B a little, a few favour A a lot: the mean's CI excludes 0 toward A while the
    signed ranks favour B. Neither arm may be named."""
    diff = np.array([-0.1] * 60 + [1.0] * 15)
    b = np.zeros(75)
    result = compare_paired("m", (b + diff).tolist(), b.tolist(), config=CONFIG)
    assert result.ci_low is not None and result.ci_low > 0 and result.wilcoxon_p is not None
    assert result.wilcoxon_p < 0.05 and result.losses == 60
    assert "point opposite ways" in result.verdict and "better" not in result.verdict


def test_too_few_pairs_say_so() -> None:
    result = compare_paired("m", [2.0] * 5, [1.0] * 5, config=CONFIG)  # five wins: exact p >= 0.0625
    assert "too few units" in result.verdict
    assert "A better" in compare_paired("m", [2.0] * 6, [1.0] * 6, config=CONFIG).verdict  # p = 0.031


def test_sign_flip_test_is_exact_for_few_groups_and_seeded_for_many() -> None:
    from persona_router.eval.stats import sign_flip_test

    assert sign_flip_test(np.ones(6), np.ones(6), n_resamples=1000, seed=0) == pytest.approx(2 / 64)
    assert sign_flip_test(np.array([1.0, -1.0]), np.ones(2), n_resamples=1000, seed=0) == 1.0
    many = np.random.default_rng(5).normal(0.3, 1.0, size=40)
    first = sign_flip_test(many, np.full(40, 2.0), n_resamples=2000, seed=3)
    assert first == sign_flip_test(many, np.full(40, 2.0), n_resamples=2000, seed=3) and 0 < first < 1


def test_a_planted_difference_over_many_groups_gets_a_verdict() -> None:
    rng = np.random.default_rng(6)
    sizes = [5] * 10 + [1] * 50  # ten parallel questions of five personas, fifty own questions
    groups = [k for k, size in enumerate(sizes) for _ in range(size)]
    b = rng.normal(0.5, 0.1, size=len(groups))
    a = b + 0.1 + rng.normal(0.0, 0.05, size=len(groups))
    result = compare_paired("m", a.tolist(), b.tolist(), config=CONFIG, groups=groups)
    assert result.n == 60 and result.n_items == 100 and result.test == "cluster sign-flip"
    assert result.test_p is not None and result.test_p < 0.01 and result.ci_low is not None and result.ci_low > 0
    assert "A better" in result.verdict and "cluster sign-flip p=" in result.verdict
