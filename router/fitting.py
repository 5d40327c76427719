"""Fit a router on labelled utterances and report how well it routes.

Fitting: embed the utterances (plus the pack's examples), pick the classifier's hyper-parameter by
cross-validated log-loss on the training utterances only, calibrate a temperature and per-persona
thresholds on the same out-of-fold scores, then refit on everything. A held-out split, when given, is only
ever scored (``router/report.py``, whose names this module also offers).
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from persona_router.core.atomic import file_stamp
from persona_router.core.errors import ConfigError, DataError, RouterModelError, StaleRouterError, choices
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
    rare_labels,
    scored_cutoff,
    softmax,
    usable_folds,
)
from persona_router.router.classifier import CLASSIFIER_KINDS, ClassifierConfig, fit_classifier
from persona_router.router.encoder import DEFAULT_EMBEDDER, Encoder
from persona_router.router.onnx_encoder import DEFAULT_BACKEND, build_encoder, check_backend
from persona_router.router.persona_router import (
    ROUTER_FILE,
    PersonaRouter,
    default_router_dir,
    read_description,
    router_lock,
)
from persona_router.router.report import RoutingReport, evaluate, fmt_optional, report_from_probabilities

__all__ = ["CV_TITLE", "FitConfig", "FitResult", "RoutingReport", "TrainingSet", "default_training_records",
           "ensure_router", "evaluate", "fit_router", "fitted_with_defaults", "fmt_optional", "load_routing_records",
           "refit_command", "report_from_probabilities", "training_set"]

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

    records: list[RoutingRecord] = []
    for path in paths:
        if not Path(path).is_file():
            raise DataError("no such data file", path=path)
        before = len(records)
        for where, row in iter_rows(Path(path)):
            record = routing_from_row(row, where=where)
            if record.persona not in pack:
                raise DataError(f"unknown persona {record.persona!r}; valid personas: {', '.join(pack.names)}",
                                path=where, field="persona")
            records.append(record)
        if len(records) == before:  # else --data would be recorded as used, --test would drop its report
            raise DataError("contains no rows", path=path)
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
               embeddings: np.ndarray | None = None, default_settings: bool = False,
               data_files: Sequence[str | Path] | None = None) -> FitResult:
    """Fit, calibrate and return a router; ``embeddings`` of the training set may be passed to skip encoding.

    ``default_settings`` says that the router is fitted with the default data, embedder, backend and
    ``FitConfig``: only such a router may ``ensure_router`` refit by itself. ``data_files`` (the files
    ``records`` came from) are recorded so that the command that refits the router can be given.
    """
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
        rare = [data.names[i] for i in rare_labels(data.labels, folds)]
        if rare:
            log.warning("%s: too few training texts to be cross-validated (%d or more are needed with %d folds), "
                        "so trained on but never scored and not inferred (routable by name)", ", ".join(rare),
                        scored_cutoff(data.labels, folds), folds)
        thresholds, reached = fit_thresholds(probs, oof_labels, data.names, calibration_config)
        calibration = Calibration(temperature, thresholds, calibration_config.target_precision, reached)
    classifier = fit_classifier(chosen, x, data.labels, len(data.names))
    info = {"classifier": chosen.to_json(), "counts": data.counts, "folds": folds, "repeats": config.repeats,
            "seed": config.seed, "min_threshold": config.min_threshold, "selection": selection,
            "default_settings": default_settings}
    if data_files is not None:
        info["data"] = [str(Path(f).expanduser().resolve()) for f in data_files] or None
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


def ensure_router(pack: PersonaPack | None = None, *, encoder: Encoder | None = None, path: str | Path | None = None,
                  refit: bool = False, backend: str = DEFAULT_BACKEND) -> PersonaRouter:
    """The pack's router from its default folder, fitted there first if missing or stale (takes seconds).

    Only a router fitted with the default data and settings (by this function, or by ``fit-router`` without
    options; ``fitted_with_defaults``) is refitted when stale: a default fit loses nothing. One fitted with
    the user's own data, embedder, backend or settings is used as it is (with its own embedder), and when it
    is stale this raises with the command that refits it rather than overwrite it with a default fit; so does
    a ``router.json`` that cannot be read. ``refit`` (an explicit request) refits and replaces whatever is
    there. Without an ``encoder``, the default embedder runs on ``backend``; a default router fitted on another
    backend counts as stale (the default folder follows the default backend).
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
    router = fit_router(pack, records, encoder=encoder or build_encoder(None, backend), config=FitConfig(),
                        default_settings=True).router
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
    """The router saved in ``folder`` if it serves this pack; None if there is none, or if it is a stale one
    with default settings (to be refitted). A stale router of the user's own raises ``RouterModelError``."""
    if not (folder / ROUTER_FILE).is_file():
        return None
    try:
        description = read_description(folder)
    except RouterModelError as exc:
        raise RouterModelError(f"{exc.detail}; cannot tell how this router was fitted, so it is not replaced by "
                               "itself: refit it (persona-router fit-router --pack PACK --out FOLDER) or remove the "
                               "folder", path=folder) from exc
    if not fitted_with_defaults(description):
        return _custom_router(folder, description, pack, encoder)
    try:
        router = PersonaRouter.load(folder, pack=pack, encoder=encoder)
    except RouterModelError as exc:
        if say:  # the reason without the error's own "refit it" advice: this is the refit
            log.warning("refitting the router (it was fitted with the default settings): %s", _why(exc))
        return None
    fitted_on = getattr(router.encoder, "backend", "torch")
    if encoder is not None or fitted_on == backend:
        return router
    if say:
        log.warning("refitting the router: fitted with the %s encoder, the default is now %s", fitted_on, backend)
    return None


def _custom_router(folder: Path, description: dict[str, Any], pack: PersonaPack,
                   encoder: Encoder | None) -> PersonaRouter:
    # The caller's encoder only saves loading one: a router fitted with another embedder brings its own.
    recorded = _section(description, "embedder").get("fingerprint")
    mine = encoder if encoder is not None and encoder.fingerprint == recorded else None
    try:
        return PersonaRouter.load(folder, pack=pack, encoder=mine)
    except RouterModelError as exc:
        raise RouterModelError(
            f"{_why(exc)}. It was fitted with your own data or settings, so it is not refitted with the defaults "
            f"by itself; refit it: {refit_command(description, folder)} (or remove the folder to have it fitted "
            "with the default settings)", path=folder) from exc


def _why(exc: RouterModelError) -> str:
    """What is wrong with a saved router, without a stale one's generic advice (it drops the router's options)."""
    return exc.reason if isinstance(exc, StaleRouterError) else exc.detail


def fitted_with_defaults(description: dict[str, Any]) -> bool:
    """Whether a saved router was fitted with the default data, embedder, backend and settings.

    Routers record it (``fit.default_settings``). Those saved before they did are judged by the settings they
    record (embedder, classifier kind, target precision, threshold floor): their data cannot be told, and their
    backend is not held against them (the default backend changed, and such routers were refitted on it).
    """
    fit = _section(description, "fit")
    if isinstance(fit.get("default_settings"), bool):
        return bool(fit["default_settings"])
    defaults, embedder = FitConfig(), _section(description, "embedder")
    classifier, calibration = _section(description, "classifier"), _section(description, "calibration")
    return (embedder.get("id", DEFAULT_EMBEDDER) == DEFAULT_EMBEDDER
            and classifier.get("kind", defaults.classifier) == defaults.classifier
            and calibration.get("target_precision", defaults.target_precision) == defaults.target_precision
            and fit.get("min_threshold", defaults.min_threshold) == defaults.min_threshold)


def refit_advice(pack: PersonaPack, pack_arg: str) -> tuple[str, bool]:
    """After a pack edit: the command that refits the pack's router, and whether a server refits it by itself
    (only a router fitted with the defaults; one of the user's own keeps its data and settings)."""
    folder = default_router_dir(pack.name)
    plain = shlex.join(["persona-router", "fit-router", "--pack", pack_arg])
    if not (folder / ROUTER_FILE).is_file():
        return plain, True
    try:
        description = read_description(folder)
    except RouterModelError:
        return plain, False
    if fitted_with_defaults(description):
        return plain, True
    return refit_command(description, folder), False


def refit_command(description: dict[str, Any], folder: Path) -> str:
    """The ``fit-router`` command that refits a saved router with the settings it records."""
    pack, fit, embedder = (_section(description, key) for key in ("pack", "fit", "embedder"))
    words = ["persona-router", "fit-router", "--pack", str(pack.get("source", "PACK"))]
    data = fit.get("data", "unknown")
    if isinstance(data, list):
        words += [part for path in data for part in ("--data", str(path))]
    if embedder.get("id", DEFAULT_EMBEDDER) != DEFAULT_EMBEDDER:
        words += ["--embedder", str(embedder["id"])]
    if embedder.get("backend", DEFAULT_BACKEND) != DEFAULT_BACKEND:
        words += ["--encoder-backend", str(embedder["backend"])]
    kind = _section(description, "classifier").get("kind", "logreg")
    if kind != FitConfig().classifier:
        words += ["--classifier", str(kind)]
    target = _section(description, "calibration").get("target_precision", FitConfig().target_precision)
    if target != FitConfig().target_precision:
        words += ["--target-precision", str(target)]
    if "name" not in pack or Path(folder) != default_router_dir(str(pack["name"])):
        words += ["--out", str(folder)]
    command = shlex.join(words)
    return command if data != "unknown" else f"{command} --data FILE (the utterances it was fitted on)"


def _section(description: dict[str, Any], key: str) -> dict[str, Any]:
    """One part of a ``router.json`` that may be damaged: an empty one where it is missing or not an object."""
    value = description.get(key)
    return value if isinstance(value, dict) else {}
