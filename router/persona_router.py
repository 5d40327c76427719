"""The persona router: a question (and optionally a named persona) in, a ``Decision`` out.

A named persona is checked against the pack and used as is. Otherwise the question is embedded, scored by
the classifier, turned into calibrated probabilities, and the top persona is accepted only if its
probability clears that persona's threshold; else the pack's fallback persona answers and the decision
says why. A fitted router is a folder: ``router.json`` (embedder id and fingerprint, pack name and hash,
labels, classifier description, calibration) and ``classifier.safetensors``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from persona_router.core.atomic import atomic_dir, file_stamp, remove_stale_temps
from persona_router.core.errors import InvalidRequestError, PackError, RouterModelError, StaleRouterError
from persona_router.core.file_lock import file_lock
from persona_router.core.home import home_dir
from persona_router.core.pack import DEMO_PACK, PersonaPack, demo_pack_path, load_pack
from persona_router.router.calibration import DECIMALS, NEVER, Calibration
from persona_router.router.classifier import Classifier, load_classifier, save_classifier
from persona_router.router.decision import Decision, explicit
from persona_router.router.encoder import Encoder, load_encoder

log = logging.getLogger(__name__)

ROUTER_FILE = "router.json"
ENCODER_DIR = "encoder"  # an exported encoder (router.onnx_encoder), copied in so the folder is self-contained
FORMAT_VERSION = 1
BATCH_SIZE = 64


def default_router_dir(pack_name: str) -> Path:
    return home_dir() / "router" / pack_name


def pack_hash(pack: PersonaPack) -> str:
    """Hash what routing depends on: names, fallback, descriptions and examples (not system prompts)."""
    personas = sorted(({"name": p.name, "fallback": p.fallback, "description": p.description,
                        "examples": list(p.examples)} for p in pack.personas), key=lambda p: str(p["name"]))
    return "sha256:" + hashlib.sha256(json.dumps(personas, sort_keys=True).encode()).hexdigest()


def pack_reference(pack: PersonaPack) -> str:
    """How to find the pack again: ``demo`` for the bundled one, else its file."""
    path = Path(pack.source)
    if not path.is_file():
        return pack.source
    if path.resolve() == demo_pack_path().resolve():
        return DEMO_PACK
    return str(path.resolve())


class PersonaRouter:
    """Routes questions to personas of one pack. Decisions are deterministic for a given question."""

    def __init__(self, *, pack: PersonaPack, encoder: Encoder, classifier: Classifier, calibration: Calibration,
                 labels: Sequence[str], info: dict[str, Any] | None = None) -> None:
        if sorted(labels) != sorted(pack.names):
            raise RouterModelError(f"the router's personas {sorted(labels)} differ from the pack's "
                                   f"{sorted(pack.names)}", field="labels")
        missing = set(labels) - set(calibration.thresholds)
        if missing:
            raise RouterModelError(f"no threshold for personas {sorted(missing)}", field="thresholds")
        self.pack = pack
        self.encoder = encoder
        self.classifier = classifier
        self.calibration = calibration
        self.labels = tuple(labels)
        self.info = dict(info or {})
        self._fallback = pack.fallback.name
        self._thresholds = np.array([calibration.thresholds[name] for name in self.labels])

    # ---- deciding -------------------------------------------------------------------------------------

    def decide(self, question: str, persona: str | None = None) -> Decision:
        """Route one question; ``persona`` (a name from the pack) skips inference."""
        if persona is not None:
            _check_question(question, field="question")
            return explicit(self.pack.get(persona).name)
        return self.decide_from_probabilities(self.probabilities([_check_question(question, field="question")])[0])

    def decide_batch(self, questions: Sequence[str], personas: Sequence[str | None] | None = None, *,
                     batch_size: int = BATCH_SIZE) -> list[Decision]:
        """Route many questions in input order; only those without a named persona are embedded."""
        if personas is not None and len(personas) != len(questions):
            raise InvalidRequestError(f"{len(personas)} personas for {len(questions)} questions", field="personas")
        named = list(personas) if personas is not None else [None] * len(questions)
        texts = [_check_question(q, field=f"questions[{i}]") for i, q in enumerate(questions)]
        for name in named:
            if name is not None:
                self.pack.get(name)
        to_infer = [i for i, name in enumerate(named) if name is None]
        probs = self.probabilities([texts[i] for i in to_infer], batch_size=batch_size)
        inferred = dict(zip(to_infer, (self.decide_from_probabilities(row) for row in probs), strict=True))
        return [inferred[i] if name is None else explicit(name) for i, name in enumerate(named)]

    def probabilities(self, questions: Sequence[str], *, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Calibrated probabilities, one row per question, columns in ``self.labels`` order."""
        if not questions:
            return np.zeros((0, len(self.labels)))
        embeddings = self.encoder.encode(list(questions), batch_size=batch_size)
        return self.calibration.probabilities(self.classifier.scores(embeddings))

    def decide_from_probabilities(self, probs: np.ndarray) -> Decision:
        # argmax takes the first of equal maxima, so ties resolve by label order, always the same way.
        order = np.argsort(-probs, kind="stable")
        top = int(order[0])
        name, confidence, threshold = self.labels[top], float(probs[top]), float(self._thresholds[top])
        # NEVER: the persona is never inferred (its precision target was out of reach).
        if threshold < NEVER and confidence >= threshold:
            second = int(order[1]) if len(order) > 1 else None
            return Decision(persona=name, source="inferred", confidence=confidence,
                            runner_up=None if second is None else self.labels[second],
                            runner_up_score=None if second is None else float(probs[second]))
        fallback = self.labels.index(self._fallback)
        alternative = next((int(i) for i in order if int(i) != fallback), None)
        return Decision(persona=self._fallback, source="fallback", confidence=float(probs[fallback]),
                        runner_up=None if alternative is None else self.labels[alternative],
                        runner_up_score=None if alternative is None else float(probs[alternative]),
                        reason=self._fallback_reason(name, confidence, threshold))

    def _fallback_reason(self, name: str, confidence: float, threshold: float) -> str:
        answer = f"answering as the fallback persona {self._fallback!r}"
        if threshold >= NEVER:
            # A "threshold 1.000" would read as a near miss; the persona is switched off by calibration.
            never = (f"{name!r} (confidence {confidence:.3f}) is never inferred: in cross-validation it had too few "
                     f"texts, or its predictions did not reach the target precision "
                     f"{self.calibration.target_precision:.2f}")
            return f"the top guess {never}" if name == self._fallback else f"{never}; {answer}"
        shown, bar = distinct_pair(confidence, threshold)
        if name == self._fallback:
            return (f"the top guess is the fallback persona {name!r} itself, at confidence {shown}, "
                    f"below its threshold {bar}")
        return (f"confidence {shown} for {name!r} is below its threshold {bar} "
                f"(target precision {self.calibration.target_precision:.2f}); {answer}")

    # ---- saving and loading ---------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "pack": {"name": self.pack.name, "source": pack_reference(self.pack), "hash": pack_hash(self.pack),
                     "fallback": self._fallback},
            "embedder": _describe_encoder(self.encoder),
            "labels": list(self.labels),
            "classifier": self.classifier.config.to_json(),
            "calibration": self.calibration.to_json(),
            "fit": self.info,
        }

    def save(self, path: str | Path, *, extra: Callable[[Path], None] | None = None, lock: bool = True) -> Path:
        """Write the router folder atomically (a crash never leaves a half-written router).

        ``extra(folder)`` may add files (such as the fit report) inside the same atomic write. The write holds
        the folder's lock (``router_lock``) unless ``lock=False`` says the caller already does. A folder that
        is there already is replaced only if it is a router or empty (``check_replaceable``).
        """
        target = Path(path)
        if lock:
            with router_lock(target):
                return self.save(target, extra=extra, lock=False)
        check_replaceable(target)
        remove_stale_temps(target.parent, of=target.name)  # this router's only: others' saves may be running
        with atomic_dir(target, replace=True) as tmp:
            description = self.describe()
            description["classifier"] = save_classifier(self.classifier, tmp)
            if description["embedder"]["backend"] != "torch":
                shutil.copytree(self.encoder.folder, tmp / ENCODER_DIR)  # type: ignore[attr-defined]
            (tmp / ROUTER_FILE).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n",
                                           encoding="utf-8")
            if extra is not None:
                extra(tmp)
        log.info("saved router to %s", target)
        return target

    @classmethod
    def load(cls, path: str | Path, *, pack: PersonaPack | None = None,
             encoder: Encoder | None = None) -> PersonaRouter:
        """Load a fitted router; refuse it if the pack's personas or the embedder changed since fitting.

        Without ``pack``, the pack recorded in ``router.json`` is loaded. A save that replaces the folder while
        this reads it (seen as a new ``router.json``) makes it read the folder once more, so the description and
        the weights always come from one save.
        """
        folder = Path(path)
        for _ in range(2):
            before = file_stamp(folder / ROUTER_FILE)
            try:
                router = cls._load_once(folder, pack, encoder)
            except RouterModelError:
                if file_stamp(folder / ROUTER_FILE) == before:
                    raise
            else:
                if file_stamp(folder / ROUTER_FILE) == before:
                    return router
            log.info("router %s was replaced while it was read; reading it again", folder)
        raise RouterModelError("the router was replaced twice while it was read; load it again", path=folder)

    @classmethod
    def _load_once(cls, folder: Path, pack: PersonaPack | None, encoder: Encoder | None) -> PersonaRouter:
        description = read_description(folder)
        try:
            pack_info, embedder_info = description["pack"], description["embedder"]
            # Read further down: a damaged file must be refused here (and refitted), not crash the caller.
            missing = [f"pack.{key}" for key in ("source", "hash", "name") if key not in pack_info] + \
                [f"embedder.{key}" for key in ("fingerprint", "id") if key not in embedder_info]
            if missing:
                raise KeyError(", ".join(missing))
            labels = [str(name) for name in description["labels"]]
            calibration = Calibration.from_json(description["calibration"])
            classifier_info = description["classifier"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RouterModelError(f"{ROUTER_FILE} is incomplete ({type(exc).__name__}: {exc})",
                                   path=folder) from exc
        pack = _check_pack(pack, pack_info, folder) if pack is not None else _recorded_pack(pack_info, folder)
        if pack_hash(pack) != pack_info["hash"]:
            raise StaleRouterError(
                f"pack {pack.name!r} ({pack.source}) has changed personas since this router was fitted for pack "
                f"{pack_info['name']!r}", f"refit it: persona-router fit-router --pack {pack_reference(pack)}",
                path=folder)
        encoder = encoder or _load_router_encoder(folder, embedder_info)
        if encoder.fingerprint != embedder_info["fingerprint"]:
            raise StaleRouterError(
                f"the router was fitted with embedder {embedder_info['id']!r} ({embedder_info['fingerprint'][:19]}…) "
                f"but the loaded embedder {encoder.model_id!r} is {encoder.fingerprint[:19]}…",
                "refit it with persona-router fit-router", path=folder)
        classifier = load_classifier(folder, classifier_info, len(labels), encoder.dimension)
        return cls(pack=pack, encoder=encoder, classifier=classifier, calibration=calibration, labels=labels,
                   info=description.get("fit", {}))


def distinct_pair(value: float, bar: float) -> tuple[str, str]:
    """``value`` and ``bar`` (value < bar) with the fewest decimals, 3 or more, that still show them in order:
    a confidence 0.6105 under a threshold 0.6110 must not read as 0.611 below 0.611."""
    for digits in range(3, DECIMALS + 1):
        shown, bar_shown = f"{value:.{digits}f}", f"{bar:.{digits}f}"
        if float(shown) < float(bar_shown):
            return shown, bar_shown
    return f"{value:.{DECIMALS}f}", f"{bar:.{DECIMALS}f}"


def check_replaceable(folder: Path, *, field: str | None = None) -> None:
    """Refuse to save a router over anything but a router folder or an empty one.

    Saving replaces the whole folder and deletes the old one, so a mistyped ``--out`` (a home folder, a
    project) must be an error, not the loss of every file in it. ``field`` names the option that chose it.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir():
        raise RouterModelError("is not a folder; refusing to replace it with a router (choose a new or empty "
                               "folder)", path=folder, field=field)
    if (folder / ROUTER_FILE).is_file() or not any(folder.iterdir()):
        return
    raise RouterModelError(f"holds files but no {ROUTER_FILE}, so it is not a router folder; refusing to replace "
                           "(and delete) it: choose a new or empty folder", path=folder, field=field)


def fitted_pack(folder: str | Path) -> PersonaPack:
    """The pack a saved router was fitted for, loaded from where its ``router.json`` says it is."""
    folder = Path(folder)
    pack_info = read_description(folder).get("pack")
    if not isinstance(pack_info, dict) or not isinstance(pack_info.get("source"), str):
        raise RouterModelError(f"{ROUTER_FILE} is incomplete (no pack.source)", path=folder)
    return _recorded_pack(pack_info, folder)


def _recorded_pack(pack_info: dict[str, Any], folder: Path) -> PersonaPack:
    try:
        return load_pack(pack_info["source"])
    except PackError as exc:
        raise RouterModelError(f"cannot load the pack it was fitted for, {pack_info.get('name')!r} ({exc}); name "
                               "that pack explicitly (persona-router route --pack FILE)", path=folder) from exc


def _check_pack(pack: PersonaPack, pack_info: dict[str, Any], folder: Path) -> PersonaPack:
    """Another pack than the router's own is a plain mistake (say a default ``--pack demo``), not a stale router."""
    if pack.name != pack_info["name"]:
        raise RouterModelError(
            f"this router was fitted for pack {pack_info['name']!r} ({pack_info['source']}), not for pack "
            f"{pack.name!r} ({pack_reference(pack)}); use it with its own pack (persona-router route: leave out "
            f"--pack) or fit one for this pack: persona-router fit-router --pack {pack_reference(pack)} --out DIR",
            path=folder)
    return pack


def _describe_encoder(encoder: Encoder) -> dict[str, Any]:
    backend = getattr(encoder, "backend", "torch")
    info = {"id": encoder.model_id, "fingerprint": encoder.fingerprint, "backend": backend,
            "dimension": encoder.dimension, "max_seq_length": encoder.max_seq_length}
    if backend != "torch":
        # ``fingerprint`` is the export's; it names the source model's, recorded here too for people.
        info["source_fingerprint"] = encoder.source_fingerprint  # type: ignore[attr-defined]
    return info


def _load_router_encoder(folder: Path, embedder_info: dict[str, Any]) -> Encoder:
    """The encoder a router was fitted with: the torch model by id, or the export inside the router folder."""
    backend = embedder_info.get("backend", "torch")
    if backend == "torch":
        return load_encoder(embedder_info["id"])
    from persona_router.router.encoder import fingerprint_model_files, resolve_embedder
    from persona_router.router.onnx_encoder import OnnxEncoder

    encoder = OnnxEncoder(folder / ENCODER_DIR)
    # The export is self-contained, but a changed source model means the user now asks for another embedder.
    current = fingerprint_model_files(resolve_embedder(embedder_info["id"])[1])
    if current != encoder.source_fingerprint:
        raise StaleRouterError(
            f"embedder {embedder_info['id']!r} changed since its {backend} export ({current[:19]}… now, "
            f"{encoder.source_fingerprint[:19]}… exported)", "refit it with persona-router fit-router", path=folder)
    return encoder


def read_description(folder: Path) -> dict[str, Any]:
    path = Path(folder) / ROUTER_FILE
    if not path.is_file():
        raise RouterModelError("no fitted router here; fit one with: persona-router fit-router", path=folder)
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RouterModelError(f"unreadable router description: {exc}", path=path) from exc
    if not isinstance(description, dict) or description.get("format_version") != FORMAT_VERSION:
        found = description.get("format_version") if isinstance(description, dict) else None
        raise RouterModelError(f"unsupported router format {found!r} (this version reads {FORMAT_VERSION})",
                               path=path)
    return description


def _check_question(question: object, *, field: str) -> str:
    if not isinstance(question, str):
        raise InvalidRequestError(f"must be a string, got {type(question).__name__}", field=field)
    text = question.strip()
    if not text:
        raise InvalidRequestError("must not be empty or only whitespace", field=field)
    return text


def router_lock(folder: str | Path) -> contextlib.AbstractContextManager[None]:
    """The lock that one router folder's writers hold (beside it, so that replacing the folder keeps it)."""
    folder = Path(folder)
    return file_lock(folder.parent / f".{folder.name}.lock", waiting=f"waiting for another writer of {folder}")
