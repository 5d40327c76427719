"""Fit a router on labelled utterances and report how well it routes.

Fitting: embed the utterances (plus the pack's examples), pick the classifier's hyper-parameter by
cross-validated log-loss on the training utterances only, calibrate a temperature and per-persona
thresholds on the same out-of-fold scores, then refit on everything. A held-out split, when given, is only
ever scored; the report gives metrics, markdown and a confusion-matrix PNG.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from persona_router.core.atomic import file_stamp
from persona_router.core.errors import ConfigError, DataError, RouterModelError, choices
from persona_router.core.pack import DEMO_PACK, PersonaPack, load_pack
from persona_router.core.records import RoutingRecord
from persona_router.router.calibration import (
    DECIMALS,
    Calibration,
    CalibrationConfig,
    fit_temperature,
    fit_thresholds,
    negative_log_likelihood,
    out_of_fold_scores,
    softmax,
    usable_folds,
)
from persona_router.router.classifier import CLASSIFIER_KINDS, ClassifierConfig, fit_classifier
from persona_router.router.encoder import Encoder
from persona_router.router.onnx_encoder import DEFAULT_BACKEND, build_encoder, check_backend
from persona_router.router.persona_router import ROUTER_FILE, PersonaRouter, default_router_dir, router_lock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitConfig:
    classifier: str = "logreg"
    target_precision: float = 0.9
    c_grid: tuple[float, ...] = (0.25, 1.0, 4.0, 16.0)
    k_grid: tuple[int, ...] = (3, 5, 10)
    folds: int = 5
    repeats: int = 3
    seed: int = 0
    use_examples: bool = True
    use_descriptions: bool = False
    min_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.classifier not in CLASSIFIER_KINDS:
            raise ConfigError(f"{self.classifier!r} is not valid; valid: {choices(CLASSIFIER_KINDS)}",
                              field="classifier")
        if not self.c_grid or not self.k_grid:
            raise ConfigError("needs at least one candidate value", field="c_grid/k_grid")
        for value in self.c_grid:
            ClassifierConfig(c=value)
        for value in self.k_grid:
            ClassifierConfig(k=value)
        self.calibration()  # validates target_precision, folds, repeats, min_threshold

    def calibration(self) -> CalibrationConfig:
        return CalibrationConfig(target_precision=self.target_precision, folds=self.folds, repeats=self.repeats,
                                 seed=self.seed, min_threshold=self.min_threshold)

    def candidates(self) -> list[ClassifierConfig]:
        if self.classifier == "logreg":
            return [ClassifierConfig(kind="logreg", c=c) for c in self.c_grid]
        if self.classifier == "knn":
            return [ClassifierConfig(kind="knn", k=k) for k in self.k_grid]
        return [ClassifierConfig(kind="centroid")]


@dataclass(frozen=True)
class TrainingSet:
    texts: list[str]
    labels: np.ndarray
    names: tuple[str, ...]
    evaluate: np.ndarray  # rows that count as held-out examples in cross-validation
    counts: dict[str, int]


@dataclass(frozen=True)
class RoutingReport:
    """Metrics of final decisions (after abstention) and of the bare argmax, over one labelled set."""

    title: str
    labels: tuple[str, ...]
    n: int
    accuracy: float
    macro_f1: float
    coverage: float
    inferred_precision: float | None
    argmax_accuracy: float
    argmax_macro_f1: float
    per_persona: dict[str, dict[str, float]]
    confusion: list[list[int]]

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()} | {"labels": list(self.labels)}

    def to_markdown(self) -> str:
        head = (f"**{self.title}** ({self.n} questions): accuracy {self.accuracy:.3f}, macro-F1 "
                f"{self.macro_f1:.3f}, coverage {self.coverage:.3f} (inferred, not fallen back), precision of "
                f"inferred decisions {fmt_optional(self.inferred_precision)}; without abstention: accuracy "
                f"{self.argmax_accuracy:.3f}, macro-F1 {self.argmax_macro_f1:.3f}.\n\n")
        rows = ["| persona | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        rows += [f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {int(m['support'])} |"
                 for name, m in self.per_persona.items()]
        matrix = ["| true \\ decided | " + " | ".join(self.labels) + " |", "|---" * (len(self.labels) + 1) + "|"]
        matrix += [f"| {name} | " + " | ".join(str(v) for v in row) + " |"
                   for name, row in zip(self.labels, self.confusion, strict=True)]
        return head + "\n".join(rows) + "\n\nConfusion matrix (rows: true persona, columns: decision):\n\n" + \
            "\n".join(matrix) + "\n"

    def save_confusion_png(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        matrix = np.array(self.confusion)
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(self.labels)), self.labels, rotation=45, ha="right")
        ax.set_yticks(range(len(self.labels)), self.labels)
        ax.set_xlabel("decided persona")
        ax.set_ylabel("true persona")
        ax.set_title(f"{self.title}: macro-F1 {self.macro_f1:.3f}, coverage {self.coverage:.2f}")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black")
        fig.tight_layout()
        tmp = path.with_name(f".tmp-{path.name}")
        fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        tmp.replace(path)


@dataclass(frozen=True)
class FitResult:
    router: PersonaRouter
    cv_report: RoutingReport | None
    selection: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def default_training_records(pack: PersonaPack) -> list[RoutingRecord]:
    """The demo routing utterances of every persona the pack shares unchanged (same name and description) with
    the demo pack: all of them for the demo pack and for a user pack copied from it (``persona add``). Other
    personas fit on their pack examples (add utterances with --data)."""
    from persona_router.core.rows import demo_routing

    demo = load_pack(DEMO_PACK)
    shared = {p.name for p in pack.personas if p.name in demo and demo.get(p.name).description == p.description}
    if not shared:
        return []
    return [r for r in demo_routing("train") if r.persona in shared]


def load_routing_records(paths: Iterable[str | Path], pack: PersonaPack) -> list[RoutingRecord]:
    from persona_router.core.records import routing_from_row
    from persona_router.core.rows import iter_rows

    records = []
    for path in paths:
        if not Path(path).is_file():
            raise DataError("no such data file", path=path)
        for where, row in iter_rows(Path(path)):
            record = routing_from_row(row, where=where)
            if record.persona not in pack:
                raise DataError(f"unknown persona {record.persona!r}; valid personas: {', '.join(pack.names)}",
                                path=where, field="persona")
            records.append(record)
    return records


def training_set(pack: PersonaPack, records: Sequence[RoutingRecord], config: FitConfig) -> TrainingSet:
    names = tuple(sorted(pack.names))
    index = {name: i for i, name in enumerate(names)}
    texts, labels, evaluate = [], [], []
    # A text given twice for one persona (the same file as pack examples and as --data) would sit in a
    # training fold and in the fold that scores it: cross-validation would see it as held out and set the
    # thresholds too low. Each (persona, text) is kept once.
    seen: set[tuple[str, str]] = set()
    duplicates = 0

    def add(persona: str, text: str, scored: bool) -> bool:
        nonlocal duplicates
        key = (persona, " ".join(text.split()).lower())
        if key in seen:
            duplicates += 1
            return False
        seen.add(key)
        texts.append(text)
        labels.append(index[persona])
        evaluate.append(scored)
        return True

    for record in records:
        if record.persona not in index:
            raise DataError(f"unknown persona {record.persona!r}; valid personas: {', '.join(names)}",
                            field="persona")
        add(record.persona, record.question, True)
    utterances = len(texts)
    for persona in pack.personas:
        added = (list(persona.examples) if config.use_examples else []) + \
            ([persona.description] if config.use_descriptions else [])
        for text in added:
            # Descriptions describe the persona rather than ask as it: train on them, never score them.
            add(persona.name, text, text != persona.description)
    if not texts:
        raise DataError("no training utterances: give --data or keep the pack's examples", field="data")
    if duplicates:
        log.info("left out %d repeated training texts (same persona, same words)", duplicates)
    counts = {"utterances": utterances, "pack_texts": len(texts) - utterances, "duplicates_left_out": duplicates}
    return TrainingSet(texts, np.array(labels, dtype=np.int64), names, np.array(evaluate), counts)


# The thresholds are fitted on the same out-of-fold predictions this report scores: say so where it is read.
CV_TITLE = "cross-validation on train (thresholds fitted on these same predictions, so optimistic)"


def fit_router(pack: PersonaPack, records: Sequence[RoutingRecord], *, encoder: Encoder, config: FitConfig,
               embeddings: np.ndarray | None = None) -> FitResult:
    """Fit, calibrate and return a router; ``embeddings`` of the training set may be passed to skip encoding."""
    started = time.perf_counter()
    data = training_set(pack, records, config)
    x = encoder.encode(data.texts) if embeddings is None else embeddings
    calibration_config = config.calibration()
    folds = usable_folds(data.labels, calibration_config.folds)
    selection: list[dict[str, Any]] = []
    cv_report = None
    if folds == 0:
        log.warning("fewer than two personas have two or more training texts: no cross-validation, "
                    "thresholds = %.2f", calibration_config.min_threshold)
        chosen = config.candidates()[0]
        calibration = Calibration(1.0, {n: calibration_config.min_threshold for n in data.names},
                                  calibration_config.target_precision)
    else:
        chosen, oof_scores, oof_labels, temperature, selection = _select(data, x, config, folds)
        probs = np.round(softmax(oof_scores / temperature), DECIMALS)
        rare = [name for i, name in enumerate(data.names) if int((data.labels == i).sum()) < folds]
        if rare:
            log.warning("%s: fewer training texts than the %d folds, so trained on but never scored and not "
                        "inferred (routable by name) until each has %d or more", ", ".join(rare), folds, folds)
        thresholds, reached = fit_thresholds(probs, oof_labels, data.names, calibration_config)
        calibration = Calibration(temperature, thresholds, calibration_config.target_precision, reached)
    classifier = fit_classifier(chosen, x, data.labels, len(data.names))
    info = {"classifier": chosen.to_json(), "counts": data.counts, "folds": folds, "repeats": config.repeats,
            "seed": config.seed, "min_threshold": config.min_threshold, "selection": selection}
    router = PersonaRouter(pack=pack, encoder=encoder, classifier=classifier, calibration=calibration,
                           labels=data.names, info=info)
    if folds:
        cv_report = report_from_probabilities(router, probs, oof_labels, title=CV_TITLE)
    seconds = time.perf_counter() - started
    log.info("fitted a %s router on %d texts in %.1f s", chosen.kind, len(data.texts), seconds)
    return FitResult(router, cv_report, selection, seconds)


def _select(data: TrainingSet, x: np.ndarray, config: FitConfig,
            folds: int) -> tuple[ClassifierConfig, np.ndarray, np.ndarray, float, list[dict[str, Any]]]:
    """The candidate with the lowest out-of-fold log-loss after temperature scaling."""
    best: tuple[float, ClassifierConfig, np.ndarray, np.ndarray, float] | None = None
    selection = []
    n_labels = len(data.names)
    for candidate in config.candidates():
        def score_fn(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray,
                     candidate: ClassifierConfig = candidate) -> np.ndarray:
            return fit_classifier(candidate, train_x, train_y, n_labels).scores(eval_x)

        scores, labels = out_of_fold_scores(x, data.labels, score_fn, folds=folds, repeats=config.repeats,
                                            seed=config.seed, evaluate=data.evaluate)
        temperature = fit_temperature(scores, labels)
        nll = negative_log_likelihood(scores, labels, temperature)
        accuracy = float((scores.argmax(axis=1) == labels).mean())
        selection.append({**candidate.to_json(), "cv_log_loss": round(nll, 4), "cv_accuracy": round(accuracy, 4),
                          "temperature": temperature})
        if best is None or nll < best[0] - 1e-9:
            best = (nll, candidate, scores, labels, temperature)
    assert best is not None
    return best[1], best[2], best[3], best[4], selection


def evaluate(router: PersonaRouter, records: Sequence[RoutingRecord], *, title: str,
             embeddings: np.ndarray | None = None) -> RoutingReport:
    """Score a labelled set (never fitted on) with the router's final decisions."""
    index = {name: i for i, name in enumerate(router.labels)}
    truth = np.array([index[r.persona] for r in records])
    x = router.encoder.encode([r.question for r in records]) if embeddings is None else embeddings
    probs = router.calibration.probabilities(router.classifier.scores(x))
    return report_from_probabilities(router, probs, truth, title=title)


def report_from_probabilities(router: PersonaRouter, probs: np.ndarray, truth: np.ndarray, *,
                              title: str) -> RoutingReport:
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    index = {name: i for i, name in enumerate(router.labels)}
    decisions = [router.decide_from_probabilities(row) for row in probs]
    decided = np.array([index[d.persona] for d in decisions])
    inferred = np.array([d.source == "inferred" for d in decisions])
    argmax = probs.argmax(axis=1)
    every = list(range(len(router.labels)))
    precision, recall, f1, support = precision_recall_fscore_support(truth, decided, labels=every, zero_division=0)
    per_persona = {name: {"precision": round(float(precision[i]), 4), "recall": round(float(recall[i]), 4),
                          "f1": round(float(f1[i]), 4), "support": int(support[i])}
                   for i, name in enumerate(router.labels)}
    return RoutingReport(
        title=title, labels=router.labels, n=int(truth.size),
        accuracy=round(float((decided == truth).mean()), 4),
        macro_f1=round(float(f1_score(truth, decided, labels=every, average="macro", zero_division=0)), 4),
        coverage=round(float(inferred.mean()), 4),
        inferred_precision=round(float((decided[inferred] == truth[inferred]).mean()), 4) if inferred.any() else None,
        argmax_accuracy=round(float((argmax == truth).mean()), 4),
        argmax_macro_f1=round(float(f1_score(truth, argmax, labels=every, average="macro", zero_division=0)), 4),
        per_persona=per_persona,
        confusion=confusion_matrix(truth, decided, labels=every).tolist(),
    )


def fmt_optional(value: float | None) -> str:
    """A report number to 3 decimals, ``-`` when it does not exist (no decision was inferred)."""
    return "-" if value is None else f"{value:.3f}"


def ensure_router(pack: PersonaPack | None = None, *, encoder: Encoder | None = None, path: str | Path | None = None,
                  refit: bool = False, backend: str = DEFAULT_BACKEND) -> PersonaRouter:
    """The pack's router from its default folder, fitted there first if missing or stale (takes seconds).

    Without an ``encoder``, the default embedder runs on ``backend``; a router fitted on another backend
    counts as stale (the default folder follows the default backend).
    """
    pack = pack or load_pack(DEMO_PACK)
    check_backend(backend)
    folder = Path(path) if path is not None else default_router_dir(pack.name)
    seen = file_stamp(folder / ROUTER_FILE)
    if not refit:
        found = _current_router(folder, pack, encoder, backend, say=True)
        if found is not None:
            return found
    records = default_training_records(pack)
    router = fit_router(pack, records, encoder=encoder or build_encoder(None, backend), config=FitConfig()).router
    with router_lock(folder):
        # Another process (say `fit-router --data ...`, or a second server) may have saved a router for this
        # pack while this one fitted: keep theirs rather than overwrite it with a fit on the pack's examples.
        if not refit and file_stamp(folder / ROUTER_FILE) != seen:
            found = _current_router(folder, pack, encoder, backend, say=False)
            if found is not None:
                log.info("a router for %s was saved while fitting; using it", pack.name)
                return found
        router.save(folder, lock=False)
    return router


def _current_router(folder: Path, pack: PersonaPack, encoder: Encoder | None, backend: str, *,
                    say: bool) -> PersonaRouter | None:
    """The router saved in ``folder`` if it is fitted for this pack (and backend), else None."""
    if not (folder / ROUTER_FILE).is_file():
        return None
    try:
        router = PersonaRouter.load(folder, pack=pack, encoder=encoder)
    except RouterModelError as exc:
        if say:
            log.warning("refitting the router: %s", exc)
        return None
    fitted_on = getattr(router.encoder, "backend", "torch")
    if encoder is not None or fitted_on == backend:
        return router
    if say:
        log.warning("refitting the router: fitted with the %s encoder, the default is now %s", fitted_on, backend)
    return None

