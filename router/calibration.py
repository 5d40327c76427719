"""From classifier scores to calibrated probabilities and per-persona abstention thresholds.

Both are fitted on out-of-fold scores: repeated stratified k-fold cross-validation over the training
utterances, so every score used for calibration comes from a classifier that did not see that utterance.
A single temperature turns scores into probabilities (temperature scaling minimises the negative
log-likelihood); then, for each persona, the threshold is the lowest confidence at which the out-of-fold
predictions of that persona reach the target precision. Below it the router falls back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from persona_router.core.errors import ConfigError

log = logging.getLogger(__name__)

ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
# Below this many out-of-fold predictions a persona's precision is too noisy to set a threshold on.
MIN_SUPPORT = 5
# Scores are rounded before thresholding so one float ulp of encoder noise never flips a decision.
DECIMALS = 6
NEVER = 1.0  # the threshold of a persona that is never inferred


@dataclass(frozen=True)
class CalibrationConfig:
    target_precision: float = 0.9
    folds: int = 5
    repeats: int = 3
    seed: int = 0
    # Never accept a persona the classifier thinks less likely than all the others together.
    min_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.target_precision <= 1.0:
            raise ConfigError(f"{self.target_precision} must lie in (0, 1]", field="target_precision")
        if self.folds < 2:
            raise ConfigError(f"{self.folds} must be at least 2", field="folds")
        if self.repeats < 1:
            raise ConfigError(f"{self.repeats} must be at least 1", field="repeats")
        if not 0.0 <= self.min_threshold <= 1.0:
            raise ConfigError(f"{self.min_threshold} must lie in [0, 1]", field="min_threshold")


@dataclass(frozen=True)
class Calibration:
    temperature: float
    thresholds: dict[str, float]
    target_precision: float
    # Out-of-fold precision the threshold reached per persona (None: too few predictions to measure).
    cv_precision: dict[str, float | None] = field(default_factory=dict)

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        return np.round(softmax(scores / self.temperature), DECIMALS)

    def to_json(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "thresholds": dict(self.thresholds),
                "target_precision": self.target_precision, "cv_precision": dict(self.cv_precision)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Calibration:
        return cls(temperature=float(raw["temperature"]),
                   thresholds={str(k): float(v) for k, v in raw["thresholds"].items()},
                   target_precision=float(raw["target_precision"]),
                   cv_precision={str(k): (None if v is None else float(v))
                                 for k, v in raw.get("cv_precision", {}).items()})


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True), dtype=np.float64)


def usable_folds(labels: np.ndarray, wanted: int) -> int:
    """The folds to cross-validate with: as many as asked when two or more personas have enough texts
    (``min_scored_texts``), else the most at which two do. Personas with fewer are trained on in every fold,
    never scored, and never inferred, so one new persona with a few texts does not take folds away from the
    others. Only when fewer than two personas have enough at any fold count do the smallest counts decide: as
    many folds as the rarest persona with two or more texts has (0: fewer than two personas have two, so
    nothing can be cross-validated)."""
    counts = np.bincount(labels)
    for folds in range(wanted, 1, -1):  # the most folds at which two or more personas are scored
        if int((counts >= min_scored_texts(folds)).sum()) >= 2:
            return folds
    usable = counts[counts >= 2]
    return min(wanted, int(usable.min())) if usable.size >= 2 else 0


def min_scored_texts(folds: int) -> int:
    """Fewer texts than this (at least ``MIN_SUPPORT``: below it no threshold could be set anyway) make a persona
    rare: trained on, never scored."""
    return max(MIN_SUPPORT, folds)


def scored_cutoff(labels: np.ndarray, folds: int) -> int:
    """How many texts a persona needs to be scored in cross-validation with ``folds`` (from ``usable_folds``)."""
    counts = np.bincount(labels)
    return min_scored_texts(folds) if int((counts >= min_scored_texts(folds)).sum()) >= 2 else folds


def rare_labels(labels: np.ndarray, folds: int) -> np.ndarray:
    """The label ids cross-validation with ``folds`` trains on in every fold but never scores."""
    return np.flatnonzero(np.bincount(labels) < scored_cutoff(labels, folds))


def out_of_fold_scores(embeddings: np.ndarray, labels: np.ndarray, score_fn: ScoreFn, *, folds: int,
                       repeats: int, seed: int, evaluate: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack ``repeats`` rounds of stratified k-fold scores: returns (scores, labels), ``repeats * n`` rows.

    ``score_fn(train_x, train_y, eval_x)`` fits on the training folds and scores the held-out fold.
    ``evaluate`` masks which rows may be scored (e.g. utterances, not persona descriptions); every row trains.
    """
    from sklearn.model_selection import StratifiedKFold

    mask = np.ones(len(labels), dtype=bool) if evaluate is None else evaluate
    # Rare personas (``rare_labels``) cannot be stratified or give evidence: their rows train in every fold.
    rare = np.isin(labels, rare_labels(labels, folds))
    split_idx, always_train = np.flatnonzero(~rare), np.flatnonzero(rare)
    all_scores, all_labels = [], []
    for repeat in range(repeats):
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        for train_part, test_part in splitter.split(embeddings[split_idx], labels[split_idx]):
            train_idx = np.concatenate([split_idx[train_part], always_train])
            test_idx = split_idx[test_part]
            test_idx = test_idx[mask[test_idx]]
            if test_idx.size == 0:
                continue
            all_scores.append(score_fn(embeddings[train_idx], labels[train_idx], embeddings[test_idx]))
            all_labels.append(labels[test_idx])
    return np.concatenate(all_scores), np.concatenate(all_labels)


def negative_log_likelihood(scores: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    probs = softmax(scores / temperature)
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return float(-np.log(picked).mean())


def fit_temperature(scores: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood, searched on a log scale."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(lambda log_t: negative_log_likelihood(scores, labels, math.exp(log_t)),
                             bounds=(math.log(1e-3), math.log(1e3)), method="bounded",
                             options={"xatol": 1e-6})
    return round(math.exp(float(result.x)), DECIMALS)


def fit_thresholds(probs: np.ndarray, labels: np.ndarray, names: tuple[str, ...],
                   config: CalibrationConfig) -> tuple[dict[str, float], dict[str, float | None]]:
    """Per persona: the lowest confidence whose predictions at or above it reach the target precision.

    A persona whose predictions never reach it gets threshold 1.0: the router then always falls back
    rather than guess it. Returns (thresholds, the out-of-fold precision reached at each threshold).
    """
    predicted = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    thresholds: dict[str, float] = {}
    reached: dict[str, float | None] = {}
    for index, name in enumerate(names):
        mine = predicted == index
        # Predictions are stacked over the repeats: the support asked for counts texts, not their repeats.
        threshold, precision = _lowest_threshold(confidence[mine], labels[mine] == index, config.target_precision,
                                                 MIN_SUPPORT * config.repeats)
        if threshold is None:
            log.warning("persona %r: out-of-fold predictions never reach precision %.2f, so it is never inferred "
                        "(questions for it go to the fallback persona)", name, config.target_precision)
            thresholds[name] = NEVER
        else:
            # 1.0 itself means "never inferred": a persona whose predictions reach the target only at a
            # (rounded) certainty of 1 accepts them from just below it.
            thresholds[name] = round(min(max(threshold, config.min_threshold), NEVER - 10.0**-DECIMALS), DECIMALS)
        reached[name] = None if precision is None else round(precision, 4)
    return thresholds, reached


def _lowest_threshold(confidence: np.ndarray, correct: np.ndarray, target: float,
                      min_support: int = MIN_SUPPORT) -> tuple[float | None, float | None]:
    if confidence.size < min_support:
        return None, None
    order = np.argsort(-confidence, kind="stable")
    sorted_conf = confidence[order]
    # Precision of "accept everything at or above sorted_conf[i]", for each i (descending confidence).
    precision = np.cumsum(correct[order]) / np.arange(1, confidence.size + 1)
    # A threshold admits every prediction with its confidence, so only the last of a run of ties counts.
    group_end = np.append(sorted_conf[:-1] > sorted_conf[1:], True)
    enough = np.arange(1, confidence.size + 1) >= min_support
    ok = np.flatnonzero((precision >= target) & enough & group_end)
    if ok.size == 0:
        return None, None
    last = int(ok.max())
    return float(sorted_conf[last]), float(precision[last])
