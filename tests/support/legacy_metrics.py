"""The hand-written ROUGE-L, quantile and percentile bootstrap that ``eval/`` used before it moved to
rouge-score, numpy and scipy: kept only so tests can compare the libraries' values with the old ones."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

_TOKEN = re.compile(r"[a-z0-9]+")


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if item == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> tuple[float, float, float]:
    """(precision, recall, F1) over lowercased alphanumeric tokens, no stemming."""
    pred, ref = _TOKEN.findall(prediction.lower()), _TOKEN.findall(reference.lower())
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0, 0.0, 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return precision, recall, 2 * precision * recall / (precision + recall)


def quantile(sorted_values: Sequence[float], q: float) -> float:
    position = (len(sorted_values) - 1) * q
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


def percentile_bootstrap_ci(diff: Any, *, n_boot: int, confidence: float, seed: int) -> tuple[float, float]:
    import numpy as np

    values = np.asarray(diff, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))
