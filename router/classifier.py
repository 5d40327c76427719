"""Classifiers over unit-length sentence embeddings, with inference in plain numpy.

Three kinds, compared in the README: ``logreg`` (multinomial logistic regression, fitted with scikit-learn),
``centroid`` (cosine similarity to each persona's mean utterance) and ``knn`` (per persona, the mean cosine
similarity of its ``k`` nearest training utterances, the semantic-router way). Each produces one score per
persona; ``router/calibration.py`` turns scores into probabilities. Weights are saved as safetensors plus a
JSON description, so a server loads them without pickle or scikit-learn.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from persona_router.core.errors import ConfigError, RouterModelError, choices

CLASSIFIER_KINDS = ("logreg", "centroid", "knn")
WEIGHTS_FILE = "classifier.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    kind: str = "logreg"
    c: float = 1.0  # inverse L2 strength of logreg
    k: int = 10  # neighbours per persona for knn

    def __post_init__(self) -> None:
        if self.kind not in CLASSIFIER_KINDS:
            raise ConfigError(f"{self.kind!r} is not valid; valid: {choices(CLASSIFIER_KINDS)}", field="classifier")
        if not (math.isfinite(self.c) and self.c > 0):
            raise ConfigError(f"{self.c} must be a positive number", field="c")
        if self.k < 1:
            raise ConfigError(f"{self.k} must be at least 1", field="k")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "c": self.c, "k": self.k}


def _products(embeddings: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``embeddings @ rows.T`` in float64. Products of float32 values are exact there, so a row's scores no longer
    depend on the BLAS kernel, which differs between one row and a batch and between CPUs: in float32 the
    rounded probabilities of ``decide`` and ``decide_batch`` parted in the sixth decimal on an AMD EPYC."""
    return np.asarray(embeddings, dtype=np.float64) @ np.asarray(rows, dtype=np.float64).T


class Classifier(Protocol):
    @property
    def config(self) -> ClassifierConfig: ...

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, dim) unit rows -> (n, n_labels) scores; larger is more likely."""
        ...

    def tensors(self) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class LinearClassifier:
    config: ClassifierConfig
    weight: np.ndarray  # (n_labels, dim)
    bias: np.ndarray  # (n_labels,)

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        return _products(embeddings, self.weight) + self.bias

    def tensors(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}


@dataclass(frozen=True)
class CentroidClassifier:
    config: ClassifierConfig
    centroids: np.ndarray  # (n_labels, dim), unit rows

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        return _products(embeddings, self.centroids)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids}


@dataclass(frozen=True)
class KNNClassifier:
    config: ClassifierConfig
    points: np.ndarray  # (n_points, dim), unit rows
    point_labels: np.ndarray  # (n_points,) label index of each point
    n_labels: int

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        similarity = _products(embeddings, self.points)
        out = np.empty((similarity.shape[0], self.n_labels), dtype=np.float64)
        for label in range(self.n_labels):
            own = similarity[:, self.point_labels == label]
            k = min(self.config.k, own.shape[1])
            # The k largest similarities, unordered: partition is O(n) where a sort is O(n log n).
            top = np.partition(own, own.shape[1] - k, axis=1)[:, own.shape[1] - k:]
            out[:, label] = top.mean(axis=1)
        return out

    def tensors(self) -> dict[str, np.ndarray]:
        return {"points": self.points, "point_labels": self.point_labels}


def fit_classifier(config: ClassifierConfig, embeddings: np.ndarray, labels: np.ndarray,
                   n_labels: int) -> Classifier:
    """Fit one classifier; ``labels`` are indices in ``range(n_labels)`` and every index must occur."""
    counts = np.bincount(labels, minlength=n_labels)
    if counts.shape[0] != n_labels or (counts == 0).any():
        missing = [int(i) for i in np.flatnonzero(counts[:n_labels] == 0)]
        raise ConfigError(f"every persona needs training utterances; label indices without any: {missing}",
                          field="data")
    x = np.asarray(embeddings, dtype=np.float32)
    if config.kind == "logreg":
        return _fit_logreg(config, x, labels, n_labels)
    if config.kind == "centroid":
        means = np.stack([x[labels == i].mean(axis=0) for i in range(n_labels)])
        return CentroidClassifier(config, _unit_rows(means))
    return KNNClassifier(config, x.copy(), labels.astype(np.int64), n_labels)


def _fit_logreg(config: ClassifierConfig, x: np.ndarray, labels: np.ndarray, n_labels: int) -> LinearClassifier:
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:
        raise ConfigError("fitting the logreg router needs scikit-learn: pip install scikit-learn",
                          field="classifier") from exc
    # Balanced weights: a pack's personas rarely come with equal numbers of utterances.
    model = LogisticRegression(C=config.c, class_weight="balanced", max_iter=5000, tol=1e-6)
    model.fit(x, labels)
    weight = np.asarray(model.coef_, dtype=np.float32)
    bias = np.asarray(model.intercept_, dtype=np.float32)
    if weight.shape[0] != n_labels:  # scikit-learn collapses two classes into one row
        weight = np.concatenate([-weight / 2, weight / 2])
        bias = np.concatenate([-bias / 2, bias / 2])
    return LinearClassifier(config, weight, bias)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.asarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32)


def save_classifier(classifier: Classifier, folder: Path) -> dict[str, Any]:
    """Write the tensors to ``folder/classifier.safetensors``; return the JSON that describes them, with the
    file's sha256 so that a loader can tell these weights from another save's."""
    from safetensors.numpy import save

    tensors = {name: np.ascontiguousarray(t) for name, t in classifier.tensors().items()}
    data = save(tensors)
    (Path(folder) / WEIGHTS_FILE).write_bytes(data)
    return {**classifier.config.to_json(), "file": WEIGHTS_FILE, "sha256": hashlib.sha256(data).hexdigest()}


def load_classifier(folder: Path, description: dict[str, Any], n_labels: int, dimension: int) -> Classifier:
    """Load the weights ``description`` (from ``router.json``) describes; refuse other weights (a description
    without ``sha256``, from before it was recorded, is taken on trust)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(folder) / WEIGHTS_FILE
    try:
        config = ClassifierConfig(kind=description["kind"], c=float(description["c"]), k=int(description["k"]))
        expected = description.get("sha256")
        data = path.read_bytes()  # hashed and parsed from the same bytes: what is checked is what is used
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise RouterModelError(f"the weights are not the ones {description.get('file', WEIGHTS_FILE)} was "
                                   f"saved with (sha256 {str(expected)[:12]}… expected); refit the router",
                                   path=path)
        tensors = load(data)
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise RouterModelError(f"invalid classifier description: {exc}", path=folder, field="classifier") from exc
    except (OSError, SafetensorError) as exc:
        raise RouterModelError(f"cannot read the classifier weights: {exc}", path=path) from exc
    try:
        classifier = _from_tensors(config, tensors, n_labels)
    except KeyError as exc:
        raise RouterModelError(f"missing tensor {exc}", path=path) from exc
    _check_shapes(classifier, n_labels, dimension, path)
    return classifier


def _from_tensors(config: ClassifierConfig, tensors: dict[str, np.ndarray], n_labels: int) -> Classifier:
    if config.kind == "logreg":
        return LinearClassifier(config, tensors["weight"], tensors["bias"])
    if config.kind == "centroid":
        return CentroidClassifier(config, tensors["centroids"])
    return KNNClassifier(config, tensors["points"], tensors["point_labels"], n_labels)


def _check_shapes(classifier: Classifier, n_labels: int, dimension: int, path: Path) -> None:
    probe = np.zeros((1, dimension), dtype=np.float32)
    try:
        shape = classifier.scores(probe).shape
    except ValueError as exc:
        raise RouterModelError(f"weights do not fit a {dimension}-dim embedder: {exc}", path=path) from exc
    if shape != (1, n_labels):
        raise RouterModelError(f"weights give {shape[1]} scores for {n_labels} personas", path=path)
    if isinstance(classifier, KNNClassifier):
        present = np.unique(classifier.point_labels)
        if present.shape[0] != n_labels or present.min() < 0 or present.max() >= n_labels:
            raise RouterModelError("knn points do not cover every persona exactly", path=path)
