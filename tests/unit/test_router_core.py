"""Router internals without the embedding model: classifiers, calibration, decisions, save/load, refusals."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from persona_router.core.errors import ConfigError, InvalidRequestError, RouterModelError, UnknownPersonaError
from persona_router.core.pack import PersonaPack, pack_from_dict
from persona_router.core.records import RoutingRecord
from persona_router.router.calibration import Calibration, CalibrationConfig, fit_temperature, fit_thresholds, softmax
from persona_router.router.classifier import ClassifierConfig, fit_classifier, load_classifier, save_classifier
from persona_router.router.decision import Decision
from persona_router.router.fitting import FitConfig, ensure_router, fit_router
from persona_router.router.persona_router import PersonaRouter, pack_hash

from tests.support.router_stub import DIM, PERSONAS, StubEncoder, make_pack, records


@pytest.fixture(scope="module")
def fitted() -> PersonaRouter:
    return fit_router(make_pack(), records(), encoder=StubEncoder(), config=FitConfig(repeats=1)).router


@pytest.mark.parametrize("kind", ["logreg", "centroid", "knn"])
def test_classifier_save_load_gives_the_same_scores(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.repeat(np.arange(3), 10)
    classifier = fit_classifier(ClassifierConfig(kind=kind, k=3), x, y, 3)
    description = save_classifier(classifier, tmp_path)
    loaded = load_classifier(tmp_path, json.loads(json.dumps(description)), 3, DIM)
    np.testing.assert_array_equal(classifier.scores(x), loaded.scores(x))
    assert not list(tmp_path.glob("*.pkl")) and (tmp_path / "classifier.safetensors").is_file()
    with pytest.raises(RouterModelError, match="dim"):
        load_classifier(tmp_path, description, 3, DIM + 1)


def test_classifier_config_names_valid_choices() -> None:
    with pytest.raises(ConfigError, match="'logreg', 'centroid', 'knn'"):
        ClassifierConfig(kind="svm")
    with pytest.raises(ConfigError, match="target_precision"):
        FitConfig(target_precision=1.5)


def test_temperature_recovers_a_known_scale() -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((4000, 4)) * 3
    labels = np.array([rng.choice(4, p=p) for p in softmax(logits)])
    assert fit_temperature(logits * 5, labels) == pytest.approx(5, rel=0.1)


def test_threshold_is_lowest_confidence_reaching_target_precision() -> None:
    # Persona 0 predictions at confidences 0.9..0.4; the two lowest are wrong.
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.4])
    probs = np.stack([confidence, 1 - confidence], axis=1)
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    config = CalibrationConfig(target_precision=0.9, min_threshold=0.0, repeats=1)  # one round of predictions
    thresholds, reached = fit_thresholds(probs, labels, ("a", "b"), config)
    assert thresholds["a"] == 0.5 and reached["a"] == 1.0
    assert thresholds["b"] == 1.0 and reached["b"] is None  # never predicted: never inferred
    floored, _ = fit_thresholds(probs, labels, ("a", "b"), replace(config, min_threshold=0.6))
    assert floored["a"] == 0.6


def test_low_confidence_falls_back_with_a_reason(fitted: PersonaRouter) -> None:
    sure = fitted.decide("alpha alpha alpha")
    assert sure.source == "inferred" and sure.persona == "alpha" and sure.reason is None
    assert sure.runner_up in ("beta", "gamma") and sure.runner_up_score is not None
    strict = PersonaRouter(pack=fitted.pack, encoder=fitted.encoder, classifier=fitted.classifier,
                           calibration=replace(fitted.calibration, thresholds=dict.fromkeys(PERSONAS, 1.0)),
                           labels=fitted.labels)
    unsure = strict.decide("alpha alpha alpha")
    assert unsure.persona == "gamma" and unsure.source == "fallback"
    assert unsure.runner_up == "alpha" and unsure.runner_up_score == sure.confidence
    assert "'alpha' (confidence" in (unsure.reason or "") and "is never inferred" in (unsure.reason or "")
    probs = dict(zip(fitted.labels, fitted.probabilities(["alpha alpha alpha"])[0], strict=True))
    assert unsure.confidence == probs["gamma"]


def test_explicit_persona_skips_the_encoder_and_is_validated(fitted: PersonaRouter) -> None:
    encoder = fitted.encoder
    assert isinstance(encoder, StubEncoder)
    before = encoder.calls
    assert fitted.decide("anything", persona="beta") == Decision("beta", "explicit", 1.0)
    assert encoder.calls == before
    with pytest.raises(UnknownPersonaError, match="valid personas: alpha, beta, gamma"):
        fitted.decide("anything", persona="delta")
    with pytest.raises(InvalidRequestError, match="empty"):
        fitted.decide("   ", persona="beta")


@pytest.mark.parametrize("bad", ["", " ", "\n\t ", None, 42])
def test_empty_or_non_text_questions_are_clear_errors(fitted: PersonaRouter, bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="question"):
        fitted.decide(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match=r"questions\[1\]"):
        fitted.decide_batch(["alpha", bad])  # type: ignore[list-item]


def test_batch_keeps_order_and_mixes_explicit_and_inferred(fitted: PersonaRouter) -> None:
    questions = ["beta beta", "alpha alpha", "gamma gamma", "alpha why"]
    decisions = fitted.decide_batch(questions, ["gamma", None, None, None])
    assert decisions[0] == Decision("gamma", "explicit", 1.0)
    assert decisions[1:] == [fitted.decide(q) for q in questions[1:]]
    with pytest.raises(InvalidRequestError, match="personas"):
        fitted.decide_batch(questions, [None])


def test_save_load_round_trip_and_refusals(fitted: PersonaRouter, tmp_path: Path) -> None:
    folder = fitted.save(tmp_path / "router")
    loaded = PersonaRouter.load(folder, pack=make_pack(), encoder=StubEncoder())
    questions = ["alpha why", "beta how is", "gamma", "what of the"]
    np.testing.assert_array_equal(loaded.probabilities(questions), fitted.probabilities(questions))
    assert loaded.decide_batch(questions) == fitted.decide_batch(questions)
    assert loaded.calibration == fitted.calibration and loaded.labels == fitted.labels
    with pytest.raises(RouterModelError, match="embedder 'stub'"):
        PersonaRouter.load(folder, pack=make_pack(), encoder=StubEncoder("sha256:other"))
    with pytest.raises(RouterModelError, match="changed personas"):
        PersonaRouter.load(folder, pack=make_pack(extra_example="one more alpha"), encoder=StubEncoder())
    (folder / "router.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(RouterModelError, match="unreadable"):
        PersonaRouter.load(folder, pack=make_pack(), encoder=StubEncoder())
    with pytest.raises(RouterModelError, match="no fitted router"):
        PersonaRouter.load(tmp_path / "missing", pack=make_pack(), encoder=StubEncoder())


def test_pack_hash_ignores_system_prompts_but_not_examples() -> None:
    pack = make_pack()
    same = replace(pack, personas=tuple(replace(p, system_prompt="other") for p in pack.personas))
    assert pack_hash(same) == pack_hash(pack)
    assert pack_hash(make_pack(extra_example="x")) != pack_hash(pack)


def test_ensure_router_fits_once_then_loads_and_refits_when_stale(isolated_home: Path) -> None:
    encoder = StubEncoder()
    first = ensure_router(make_pack(), encoder=encoder)
    folder = isolated_home / "router" / "stubpack"
    stamp = (folder / "router.json").stat().st_mtime_ns
    again = ensure_router(make_pack(), encoder=encoder)
    assert (folder / "router.json").stat().st_mtime_ns == stamp
    assert again.calibration == first.calibration
    ensure_router(make_pack(extra_example="alpha new"), encoder=encoder)
    assert (folder / "router.json").stat().st_mtime_ns != stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]


def test_a_router_saved_while_ensure_router_fits_is_kept(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: while a server fits the pack's router, ``fit-router --data`` (another process) saves
    one for the same pack. The server must use that one, not overwrite it with its own fit."""
    import persona_router.router.fitting as fitting

    folder = isolated_home / "router" / "stubpack"
    real_fit = fitting.fit_router

    def fit_while_another_saves(pack: PersonaPack, records: Sequence[RoutingRecord], **kwargs: object) -> object:
        result = real_fit(pack, records, **kwargs)  # type: ignore[arg-type]
        more = [*records, RoutingRecord(question="alpha alpha extra", persona="alpha")]
        real_fit(pack, more, **kwargs).router.save(folder)  # type: ignore[arg-type]
        return result

    monkeypatch.setattr(fitting, "fit_router", fit_while_another_saves)
    router = ensure_router(make_pack(), encoder=StubEncoder())
    saved = json.loads((folder / "router.json").read_text())
    pack_only = [example for persona in make_pack().personas for example in persona.examples]
    assert saved["fit"]["counts"] == router.info["counts"]  # the file is theirs and so is what serves
    assert sum(router.info["counts"].values()) == len(pack_only) + 1
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]


def test_router_with_the_old_embedder_fingerprint_is_refitted(isolated_home: Path, tiny_model_dir: Path) -> None:
    """Routers saved before the one ``core/fingerprint.py`` recorded another hash of the same embedder files:
    ``ensure_router`` must see them as stale and refit, recording the new fingerprint."""
    from persona_router.router.encoder import fingerprint_model_files

    from tests.support.legacy_fingerprint import legacy_embedder_fingerprint

    old, new = legacy_embedder_fingerprint(tiny_model_dir), fingerprint_model_files(tiny_model_dir)
    ensure_router(make_pack(), encoder=StubEncoder(old))
    router_json = isolated_home / "router" / "stubpack" / "router.json"
    assert json.loads(router_json.read_text())["embedder"]["fingerprint"] == old
    with pytest.raises(RouterModelError, match="refit"):
        PersonaRouter.load(router_json.parent, pack=make_pack(), encoder=StubEncoder(new))
    encoder = StubEncoder(new)
    refitted = ensure_router(make_pack(), encoder=encoder)
    assert encoder.calls > 0  # it fitted (embedded the training texts) instead of loading
    assert json.loads(router_json.read_text())["embedder"]["fingerprint"] == new
    assert refitted.encoder is encoder
    calls = encoder.calls
    ensure_router(make_pack(), encoder=encoder)  # now current: loaded, not fitted again
    assert encoder.calls == calls


def test_decision_json_and_validation() -> None:
    decision = Decision("a", "fallback", 0.2, "b", 0.5, reason="unsure")
    assert decision.to_json() == {"persona": "a", "source": "fallback", "confidence": 0.2, "runner_up": "b",
                                  "runner_up_score": 0.5, "reason": "unsure"}
    with pytest.raises(ConfigError, match="reason"):
        Decision("a", "fallback", 0.2)
    with pytest.raises(ConfigError, match="'explicit', 'inferred', 'fallback'"):
        Decision("a", "guessed", 0.2)  # type: ignore[arg-type]


def test_calibration_json_round_trip() -> None:
    calibration = Calibration(0.25, {"a": 0.5}, 0.9, {"a": 0.95})
    assert Calibration.from_json(json.loads(json.dumps(calibration.to_json()))) == calibration


def test_a_text_given_twice_counts_once(isolated_home: Path) -> None:
    """The same utterances passed as pack examples and as --data must not sit in a training fold and in the
    fold that scores them: the fit is the one of each text once."""
    encoder = StubEncoder()
    records = [RoutingRecord(persona=name, question=f"{name} asks thing {i}") for name in PERSONAS for i in range(4)]
    once = fit_router(make_pack(), records, encoder=encoder, config=FitConfig()).router
    doubled = fit_router(make_pack(), [*records, *records, RoutingRecord(persona="alpha", question=" ALPHA  asks "
                                                                          "thing 0")],
                         encoder=encoder, config=FitConfig()).router
    assert doubled.info["counts"]["duplicates_left_out"] == len(records) + 1
    assert doubled.calibration == once.calibration


def test_classifier_comparison_fits_every_kind_on_the_same_texts() -> None:
    from persona_router.router.classifier import CLASSIFIER_KINDS
    from persona_router.router.comparison import compare_classifiers, comparison_markdown

    records = [RoutingRecord(persona=name, question=f"{name} asks thing {i}") for name in PERSONAS for i in range(4)]
    rows = compare_classifiers(make_pack(), records, records[:3], encoder=StubEncoder(), config=FitConfig())
    assert [row["classifier"] for row in rows] == list(CLASSIFIER_KINDS)
    assert all("cv" in row and "held_out" in row for row in rows)
    table = comparison_markdown(rows)
    assert table.count("\n") == 2 + len(CLASSIFIER_KINDS) and "| logreg | C=" in table


@pytest.mark.parametrize(("section", "key"), [("pack", "hash"), ("pack", "source"), ("embedder", "fingerprint")])
def test_a_damaged_router_file_is_refused_and_refitted(isolated_home: Path, section: str, key: str) -> None:
    ensure_router(make_pack(), encoder=StubEncoder())
    router_json = isolated_home / "router" / "stubpack" / "router.json"
    description = json.loads(router_json.read_text())
    del description[section][key]
    router_json.write_text(json.dumps(description))
    with pytest.raises(RouterModelError, match=f"incomplete.*{section}.{key}"):
        PersonaRouter.load(router_json.parent, pack=make_pack(), encoder=StubEncoder())
    ensure_router(make_pack(), encoder=StubEncoder())  # refits instead of crashing
    assert key in json.loads(router_json.read_text())[section]


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65])
def test_a_pack_name_that_would_leave_the_router_folder_is_refused(name: str) -> None:
    from persona_router.core.errors import PackError

    personas = [{"name": "alpha", "description": "a", "system_prompt": "p", "examples": ["e"], "fallback": True}]
    with pytest.raises(PackError) as info:
        pack_from_dict({"name": name, "personas": personas}, source="<memory>")
    assert info.value.field == "name"


def test_a_copied_pack_cannot_take_the_demo_packs_name(tmp_path: Path) -> None:
    from persona_router.core.errors import PackError
    from persona_router.core.pack import demo_pack_path, load_pack

    copy = tmp_path / "mine.toml"
    copy.write_text(demo_pack_path().read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(PackError, match="built-in pack's name"):
        load_pack(str(copy))
    assert load_pack("demo").name == "demo"


def test_support_counts_texts_not_their_repeats() -> None:
    """Two texts scored in each of three repeats are six predictions but two pieces of evidence: too few."""
    probs = np.array([[0.9, 0.1], [0.8, 0.2]] * 3)
    labels = np.zeros(6, dtype=np.int64)
    thresholds, reached = fit_thresholds(probs, labels, ("a", "b"), CalibrationConfig(repeats=3))
    assert thresholds["a"] == 1.0 and reached["a"] is None  # not inferred
    assert fit_thresholds(probs, labels, ("a", "b"), CalibrationConfig(repeats=1))[0]["a"] < 1.0


def test_a_persona_with_one_text_leaves_the_others_calibrated(isolated_home: Path) -> None:
    """``persona add`` allows a single example: that persona is trained on, never scored and not inferred;
    the others keep their cross-validated temperature and thresholds."""
    encoder = StubEncoder()
    records = [RoutingRecord(persona=name, question=f"{name} asks thing {i}") for name in ("alpha", "beta")
               for i in range(8)]
    pack = pack_from_dict({"name": "stubpack", "personas": [
        {"name": name, "description": f"the {name} persona", "system_prompt": "p", "examples": [f"{name} example"],
         "fallback": name == "gamma"} for name in PERSONAS]}, source="<memory>")
    result = fit_router(pack, records, encoder=encoder, config=FitConfig())  # gamma: its one example only
    assert result.router.info["folds"] == 5 and result.cv_report is not None  # cross-validated
    thresholds = result.router.calibration.thresholds
    assert thresholds["gamma"] == 1.0 and thresholds["alpha"] < 1.0 and thresholds["beta"] < 1.0
    assert result.router.calibration.temperature != 1.0


def test_a_persona_certain_in_every_fold_is_inferred_not_switched_off() -> None:
    """Perfectly separable out-of-fold scores round to a confidence of 1: that is the best evidence there is,
    not the "never inferred" marker."""
    probs = np.array([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 6)
    labels = np.array([0] * 6 + [1] * 6)
    thresholds, reached = fit_thresholds(probs, labels, ("a", "b"), CalibrationConfig(repeats=1))
    assert thresholds == {"a": 0.999999, "b": 0.999999} and reached == {"a": 1.0, "b": 1.0}


def test_a_fallback_reason_shows_the_digits_that_tell_confidence_from_threshold(fitted: PersonaRouter) -> None:
    """Three decimals made a confidence 0.6105 under a threshold 0.6111 read "0.611 is below its threshold 0.611";
    a never-inferred persona (threshold 1.0) read as a near miss below "threshold 1.000"."""
    alpha, beta = fitted.labels.index("alpha"), fitted.labels.index("beta")
    thresholds = {**fitted.calibration.thresholds, "alpha": 0.6111, "beta": 1.0}
    router = PersonaRouter(pack=fitted.pack, encoder=fitted.encoder, classifier=fitted.classifier,
                           calibration=replace(fitted.calibration, thresholds=thresholds), labels=fitted.labels)
    close = np.zeros(3)
    close[alpha], close[beta] = 0.6105, 0.3
    close[close == 0] = 1 - close.sum()
    reason = router.decide_from_probabilities(close).reason or ""
    assert "confidence 0.6105 for 'alpha' is below its threshold 0.6111" in reason, reason
    never = np.zeros(3)
    never[beta], never[alpha] = 0.95, 0.03
    never[never == 0] = 0.02
    reason = router.decide_from_probabilities(never).reason or ""
    assert "'beta' (confidence 0.950) is never inferred" in reason and "threshold" not in reason, reason
    assert "too few texts" in reason and "target precision 0.90" in reason


def test_a_persona_with_a_few_texts_takes_no_folds_from_the_others() -> None:
    """A persona with 2-4 texts used to cut cross-validation to 2-4 folds for every persona; it is now rare
    (trained on, never scored, never inferred) and the others keep the folds asked for."""
    from persona_router.router.calibration import rare_labels, usable_folds

    labels = np.array([0] * 12 + [1] * 12 + [2] * 3)
    assert usable_folds(labels, 5) == 5 and rare_labels(labels, 5).tolist() == [2]
    assert usable_folds(np.array([0] * 12 + [1] * 12 + [2] * 7), 5) == 5  # 7 texts: scored, 5 folds
    assert usable_folds(np.array([0] * 3 + [1] * 3 + [2]), 5) == 3  # too little data for anyone: as before
    # More folds asked than two personas can fill: the most they can, never the rare persona's count.
    fewer = np.array([0] * 7 + [1] * 7 + [2] * 2)
    assert usable_folds(fewer, 10) == 7 and rare_labels(fewer, 7).tolist() == [2]
    records = [RoutingRecord(persona=name, question=f"{name} asks thing {i}") for name in ("alpha", "beta")
               for i in range(8)] + [RoutingRecord(persona="gamma", question=f"gamma asks {i}") for i in range(2)]
    pack = pack_from_dict({"name": "stubpack", "personas": [
        {"name": name, "description": f"the {name} persona", "system_prompt": "p", "examples": [f"{name} example"],
         "fallback": name == "gamma"} for name in PERSONAS]}, source="<memory>")
    result = fit_router(pack, records, encoder=StubEncoder(), config=FitConfig())  # gamma: 3 texts in all
    assert result.router.info["folds"] == 5
    thresholds = result.router.calibration.thresholds
    assert thresholds["gamma"] == 1.0 and thresholds["alpha"] < 1.0 and thresholds["beta"] < 1.0
