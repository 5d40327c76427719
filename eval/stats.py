"""Paired statistics for two arms that answered the same items.

Per metric: each arm's mean, the mean paired difference (A - B) with a seeded BCa bootstrap confidence
interval (``scipy.stats.bootstrap``; ``StatsConfig.confidence``, 95% by default), win/tie/loss counts in the
metric's better direction, a two-sided sign test and a Wilcoxon signed-rank test, and one verdict line. A
verdict names a winner only when the bootstrap CI excludes 0 and the Wilcoxon test, one-sided in the same
direction, is below ``alpha / 2`` (the two-sided test at ``alpha`` with the ranks agreeing with the mean);
p-values are per metric, not corrected for the number of metrics compared. Pairs with a missing value on
either side cannot be paired and are left out, but counted: ``n_dropped`` and each arm's ``missing_*`` are in
the comparison and its verdict, so an arm whose answers have no value (an empty answer has no readability
grade) cannot vanish from a metric unseen.

Items that are not independent (the answers of several personas to one parallel question) are named by
``groups``. The mean difference stays the mean over items; its interval comes from a cluster bootstrap
(whole groups resampled), the verdict's test is a sign-flip permutation test of that mean with whole groups
flipped, and the win/tie/loss counts, the sign test and the (reported) Wilcoxon test take one value per group,
its items' mean difference; n counts independent questions rather than answers.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from persona_router.core.errors import ConfigError

DIRECTIONS = ("higher", "lower", "none")


@dataclass(frozen=True)
class StatsConfig:
    n_boot: int = 5000
    confidence: float = 0.95
    alpha: float = 0.05
    seed: int = 0
    tie_tolerance: float = 1e-9

    def __post_init__(self) -> None:
        if self.n_boot < 100:
            raise ConfigError(f"{self.n_boot} must be at least 100", field="n_boot")
        if not 0.5 < self.confidence < 1.0:
            raise ConfigError(f"{self.confidence} must be in (0.5, 1)", field="confidence")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"{self.alpha} must be in (0, 1)", field="alpha")


@dataclass(frozen=True)
class PairedComparison:
    metric: str
    direction: str
    n: int  # independent units (pairs, or groups of pairs) where both arms have a value
    mean_a: float | None
    mean_b: float | None
    mean_diff: float | None  # mean of (A - B)
    ci_low: float | None
    ci_high: float | None
    wins: int  # A better (or higher, for descriptive metrics)
    ties: int
    losses: int
    sign_p: float | None
    wilcoxon_p: float | None
    verdict: str
    n_items: int = 0  # paired items behind the n units (equal to n without groups)
    test: str = "Wilcoxon"  # the test behind the verdict: Wilcoxon, or the cluster sign-flip test for groups
    test_p: float | None = None
    n_dropped: int = 0  # paired items left out because a value was missing on either side
    missing_a: int = 0  # of those, items whose A value was missing
    missing_b: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def not_compared(metric: str, direction: str, reason: str) -> PairedComparison:
    """A metric left out of the comparison on purpose, saying why (so reports still list it)."""
    return _without_values(metric, direction, f"not compared ({reason})")


def _without_values(metric: str, direction: str, why: str,
                    missing: tuple[int, int, int] = (0, 0, 0)) -> PairedComparison:
    """``missing``: pairs dropped and each arm's missing values (``_missing_counts``)."""
    dropped, missing_a, missing_b = missing
    return PairedComparison(metric, direction, 0, None, None, None, None, None, 0, 0, 0, None, None, f"{metric}: {why}",
                            n_dropped=dropped, missing_a=missing_a, missing_b=missing_b)


def confidence_percent(confidence: float) -> str:
    """``0.95`` -> ``"95%"``, ``0.975`` -> ``"97.5%"`` (``:.0%`` would print 98%)."""
    return f"{round(confidence * 100, 6):g}%"


def _missing_counts(a: Sequence[float | None], b: Sequence[float | None]) -> tuple[int, int, int]:
    """(pairs dropped, A values missing, B values missing)."""
    absent_a = [not _present(x) for x in a]
    absent_b = [not _present(y) for y in b]
    dropped = sum(x or y for x, y in zip(absent_a, absent_b, strict=True))
    return dropped, sum(absent_a), sum(absent_b)


def dropped_text(missing: tuple[int, int, int], labels: tuple[str, str]) -> str:
    """How many pairs were left out and whose value was missing; "" when none was."""
    dropped, missing_a, missing_b = missing
    if not dropped:
        return ""
    return f"{dropped} pairs dropped, value missing in {labels[0]}: {missing_a}, in {labels[1]}: {missing_b}"


def compare_paired(metric: str, a: Sequence[float | None], b: Sequence[float | None], *, direction: str = "higher",
                   config: StatsConfig | None = None, labels: tuple[str, str] = ("A", "B"),
                   groups: Sequence[Hashable] | None = None) -> PairedComparison:
    """Compare two arms item by item; pairs with a missing value on either side are left out and counted
    (``n_dropped``, ``missing_a``, ``missing_b``). With ``groups`` (one key per item), items sharing a key
    form one unit of analysis."""
    import numpy as np

    config = config or StatsConfig()
    if direction not in DIRECTIONS:
        raise ConfigError(f"{direction!r} is not one of {', '.join(DIRECTIONS)}", field="direction")
    if len(a) != len(b) or (groups is not None and len(groups) != len(a)):
        raise ConfigError(f"arms have {len(a)} and {len(b)} values"
                          + (f" and {len(groups)} group keys" if groups is not None else "")
                          + "; paired data needs equal lengths", field=metric)
    keys = list(groups) if groups is not None else list(range(len(a)))
    present = [(x, y, k) for x, y, k in zip(a, b, keys, strict=True) if _present(x) and _present(y)]
    missing = _missing_counts(a, b)
    if not present:
        dropped = dropped_text(missing, labels)
        return _without_values(metric, direction, "no paired values" + (f" ({dropped})" if dropped else ""), missing)
    xa = np.array([p[0] for p in present], dtype=float)
    xb = np.array([p[1] for p in present], dtype=float)
    sums, counts = _unit_sums(xa - xb, [p[2] for p in present])
    diff = sums / counts  # one value per unit
    grouped = not np.all(counts == 1)
    low, high = bootstrap_ci(sums, n_boot=config.n_boot, confidence=config.confidence, seed=config.seed,
                             counts=counts if grouped else None)
    mean_diff = float((xa - xb).mean())
    sign = -1.0 if direction == "lower" else 1.0
    better = sign * diff
    wins = int((better > config.tie_tolerance).sum())
    losses = int((better < -config.tie_tolerance).sum())
    ties = len(diff) - wins - losses
    sign_p = sign_test(wins, losses)
    wilcoxon_p = wilcoxon_test(diff, tolerance=config.tie_tolerance)
    if not grouped:
        # Two-sided p < alpha could come from ranks that favour the other arm than the mean does: the verdict
        # asks the one-sided test toward the mean instead.
        test, test_p = "Wilcoxon", wilcoxon_p
        toward_mean = wilcoxon_test(diff, tolerance=config.tie_tolerance,
                                    alternative="greater" if mean_diff > 0 else "less")
        agrees = toward_mean < config.alpha / 2 or test_p >= config.alpha
    else:
        # Ranks of group means of unequal sizes weigh a lone answer like a five-persona question; the
        # sign-flip test is of the same item mean that the estimate and the interval are about.
        test, test_p = "cluster sign-flip", sign_flip_test(sums, counts, n_resamples=config.n_boot, seed=config.seed)
        agrees = True
    verdict = _verdict(metric, direction, mean_diff, (low, high, config.confidence), (test, test_p, agrees),
                       (len(diff), len(present), dropped_text(missing, labels)), config.alpha, labels)
    return PairedComparison(metric=metric, direction=direction, n=len(diff), mean_a=float(xa.mean()),
                            mean_b=float(xb.mean()), mean_diff=mean_diff, ci_low=low, ci_high=high,
                            wins=wins, ties=ties, losses=losses, sign_p=sign_p, wilcoxon_p=wilcoxon_p,
                            verdict=verdict, n_items=len(present), test=test, test_p=test_p,
                            n_dropped=missing[0], missing_a=missing[1], missing_b=missing[2])


def sign_flip_test(sums: Any, counts: Any, *, n_resamples: int, seed: int) -> float:
    """Two-sided paired permutation test of the mean over items, whole groups flipped: with no difference
    between the arms, each group's differences were as likely to have the opposite sign. Exact over every
    flip up to 2^16 of them, else ``n_resamples`` seeded random flips (p = (1 + hits) / (1 + n))."""
    import numpy as np

    values = np.asarray(sums, dtype=float)
    total = float(np.asarray(counts, dtype=float).sum())
    observed = abs(values.sum()) / total
    if observed == 0.0:
        return 1.0
    k = len(values)
    if k <= 16:
        grid = np.array(np.meshgrid(*[[-1.0, 1.0]] * k, indexing="ij")).reshape(k, -1).T
        hits = np.abs(grid @ values) / total >= observed * (1 - 1e-12)
        return float(hits.mean())
    flips = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_resamples, k))
    hits = np.abs(flips @ values) / total >= observed * (1 - 1e-12)
    return float((1 + hits.sum()) / (1 + n_resamples))


def _unit_sums(diff: Any, keys: Sequence[Hashable]) -> tuple[Any, Any]:
    """Each unit's summed difference and item count, units in order of first appearance."""
    import numpy as np

    sums: dict[Hashable, float] = {}
    counts: dict[Hashable, int] = {}
    for value, key in zip(diff, keys, strict=True):
        sums[key] = sums.get(key, 0.0) + float(value)
        counts[key] = counts.get(key, 0) + 1
    return np.array(list(sums.values()), dtype=float), np.array(list(counts.values()), dtype=float)


def bootstrap_ci(diff: Any, *, n_boot: int, confidence: float, seed: int,
                 counts: Any = None) -> tuple[float, float]:
    """Bias-corrected and accelerated (BCa) bootstrap CI of the mean, by ``scipy.stats.bootstrap``; the same
    seed gives the same interval. With ``counts``, ``diff`` holds each group's summed difference and
    ``counts`` its items: whole groups are resampled and the statistic is the mean over items
    (sum of sums / sum of counts), a cluster bootstrap.

    BCa corrects the percentile interval for the skew and bias of the resampled means, which matters at the
    small n of an evaluation (10-30 paired items). Where it is undefined the interval degenerates sensibly:
    fewer than two values or no spread give ``(mean, mean)``, and a BCa that scipy cannot compute (all
    resamples equal on one side) falls back to scipy's percentile interval.
    """
    import warnings

    import numpy as np
    from scipy.stats import bootstrap

    values = np.asarray(diff, dtype=float)
    sizes = np.ones_like(values) if counts is None else np.asarray(counts, dtype=float)
    mean = float(values.sum() / sizes.sum())
    per_unit = values / sizes
    if len(values) < 2 or np.all(per_unit == per_unit[0]):
        return mean, mean
    if counts is None:
        data: tuple[Any, ...] = (values,)
        statistic: Any = np.mean
    else:
        data = (values, sizes)
        statistic = _ratio_of_sums
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns, then returns NaN, for degenerate BCa cases
            result = bootstrap(data, statistic, n_resamples=n_boot, confidence_level=confidence, method=method,
                               paired=counts is not None, rng=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return low, high
    return mean, mean


def _ratio_of_sums(sums: Any, counts: Any, axis: int = -1) -> Any:
    return sums.sum(axis=axis) / counts.sum(axis=axis)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial test of wins vs losses (ties dropped); 1.0 when there is nothing to test."""
    if wins + losses == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue)


def wilcoxon_test(diff: Any, *, tolerance: float = 1e-9, alternative: str = "two-sided") -> float:
    """Wilcoxon signed-rank p-value (two-sided, or ``greater`` / ``less`` than zero); 1.0 when every difference
    is zero."""
    import numpy as np
    from scipy.stats import wilcoxon

    values = np.asarray(diff, dtype=float)
    if np.all(np.abs(values) <= tolerance):
        return 1.0
    result = wilcoxon(values, zero_method="wilcox", alternative=alternative)
    p = float(result.pvalue)
    return 1.0 if math.isnan(p) else p


def _verdict(metric: str, direction: str, mean_diff: float, ci: tuple[float, float, float],
             test: tuple[str, float, bool], n: tuple[int, int, str], alpha: float, labels: tuple[str, str]) -> str:
    """``ci``: low, high and its confidence level; ``test``: its name, p-value and whether it agrees in
    direction with the mean; ``n``: units, items and ``dropped_text`` of the pairs left out."""
    a, b = labels
    (low, high, level), (name, p, agrees), (units, items, dropped) = ci, test, n
    count = f"n={units}" if units == items else f"n={units} groups of {items} items"
    stats = (f"mean diff {mean_diff:+.4g}, {confidence_percent(level)} CI [{low:+.4g}, {high:+.4g}], "
             f"{name} p={p:.3g}, {count}" + (f", {dropped}" if dropped else ""))
    if 2.0 ** (1 - units) >= alpha:  # the smallest two-sided p either exact test can reach
        return f"{metric}: too few units for a verdict at alpha={alpha:g} ({stats})"
    excludes_zero = low > 0 or high < 0
    if excludes_zero and p < alpha and not agrees:
        return f"{metric}: no verdict, the mean and the ranks point opposite ways ({stats})"
    if not excludes_zero or p >= alpha:
        return f"{metric}: no detectable difference at {count} ({stats})"
    a_higher = mean_diff > 0
    if direction == "none":
        return f"{metric}: {a if a_higher else b} higher ({stats})"
    a_better = a_higher if direction == "higher" else not a_higher
    return f"{metric}: {a if a_better else b} better ({stats})"


def _present(value: float | None) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))
