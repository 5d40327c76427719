"""The style judge: which persona does an answer sound like? Independent of the adapters under test.

Features are sentence embeddings (the router's encoder, all-MiniLM-L6-v2 offline) and, when 5-fold
cross-validation on the training answers says they help, a few standardised stylometric features
(readability, sentence and word length, digits, parentheses, lists, second person). Answer length is
deliberately not a feature: generated answers are cut at ``max_new_tokens``, so a length feature would
grade the decoding budget rather than the register (and it broke transfer to Cochrane paragraphs).
A multinomial logistic regression is fitted on the reference answers of every persona's TRAIN split,
never on evaluated items, and is saved as ``judge.npz`` (loaded with ``allow_pickle=False``) plus ``judge.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from persona_router.core.atomic import atomic_dir
from persona_router.core.errors import ConfigError, DataError
from persona_router.core.records import QARecord
from persona_router.eval.metrics import count_syllables, flesch_kincaid_grade, sentence_count, words

log = logging.getLogger(__name__)

FEATURE_VERSION = 2
# Standardised style features are clipped: text far outside the training range (a 400-word review
# paragraph) must not get extreme logits from one feature.
STYLE_CLIP = 3.0
FEATURE_SETS = ("embedding", "embedding+style")
COCHRANE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cochrane_plain_language"
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s", re.MULTILINE)
_SECOND_PERSON = re.compile(r"\b(?:you|your|you're|yourself)\b", re.IGNORECASE)


def _style_row(text: str) -> list[float]:
    tokens = words(text)
    n = max(1, len(tokens))
    chars = max(1, len(text))
    grade = flesch_kincaid_grade(text)
    return [
        grade if grade is not None else 0.0,
        len(tokens) / sentence_count(text),
        sum(len(t) for t in tokens) / n,
        sum(count_syllables(t) >= 3 for t in tokens) / n,
        sum(c.isdigit() for c in text) / chars,
        sum(c.isupper() for c in text) / chars,
        text.count("(") / n,
        (text.count(";") + text.count(":")) / n,
        len(_BULLET.findall(text)) / n,
        len(_SECOND_PERSON.findall(text)) / n,
        text.count("?") / n,
    ]


STYLE_FEATURES = ("fk_grade", "words_per_sentence", "chars_per_word", "polysyllable_share", "digit_share",
                  "upper_share", "parens_per_word", "semicolons_colons_per_word", "list_items_per_word",
                  "second_person_per_word", "questions_per_word")


def style_features(texts: Sequence[str]) -> np.ndarray:
    return np.array([_style_row(t) for t in texts], dtype=np.float64).reshape(len(texts), len(STYLE_FEATURES))


Embed = Callable[[Sequence[str]], np.ndarray]


@dataclass
class StyleJudge:
    """A fitted judge: ``predict_proba`` gives one probability per persona in ``classes`` order."""

    classes: tuple[str, ...]
    coef: np.ndarray  # (classes, features)
    intercept: np.ndarray  # (classes,)
    feature_set: str
    style_mean: np.ndarray
    style_scale: np.ndarray
    embedder: str
    meta: dict[str, Any] = field(default_factory=dict)

    def features(self, texts: Sequence[str], embeddings: np.ndarray) -> np.ndarray:
        if self.feature_set == "embedding":
            return np.asarray(embeddings, dtype=np.float64)
        style = np.clip((style_features(texts) - self.style_mean) / self.style_scale, -STYLE_CLIP, STYLE_CLIP)
        return np.hstack([np.asarray(embeddings, dtype=np.float64), style])

    def predict_proba(self, texts: Sequence[str], embeddings: np.ndarray) -> np.ndarray:
        logits = self.features(texts, embeddings) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return np.asarray(exp / exp.sum(axis=1, keepdims=True))

    def predict(self, texts: Sequence[str], embeddings: np.ndarray) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(texts, embeddings).argmax(axis=1)]

    def save(self, folder: Path) -> None:
        """Write ``judge.npz`` and ``judge.json`` atomically (no pickle)."""
        with atomic_dir(Path(folder), replace=True) as tmp:
            np.savez(tmp / "judge.npz", coef=self.coef, intercept=self.intercept, style_mean=self.style_mean,
                     style_scale=self.style_scale)
            payload = {"classes": list(self.classes), "feature_set": self.feature_set, "embedder": self.embedder,
                       "feature_version": FEATURE_VERSION, "style_features": list(STYLE_FEATURES), **self.meta}
            (tmp / "judge.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> StyleJudge:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "judge.json").read_text(encoding="utf-8"))
            with np.load(folder / "judge.npz", allow_pickle=False) as arrays:
                coef, intercept = arrays["coef"], arrays["intercept"]
                style_mean, style_scale = arrays["style_mean"], arrays["style_scale"]
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"cannot load the style judge: {exc}", path=folder) from exc
        if meta.get("feature_version") != FEATURE_VERSION:
            raise DataError(f"judge features v{meta.get('feature_version')} != v{FEATURE_VERSION}; refit it",
                            path=folder)
        extra = {k: v for k, v in meta.items()
                 if k not in ("classes", "feature_set", "embedder", "feature_version", "style_features")}
        return cls(classes=tuple(meta["classes"]), coef=coef, intercept=intercept, feature_set=meta["feature_set"],
                   style_mean=style_mean, style_scale=style_scale, embedder=meta["embedder"], meta=extra)


def _fit_lr(x: np.ndarray, y: np.ndarray, *, c: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(x, y)


def _as_multiclass(model: Any) -> tuple[np.ndarray, np.ndarray]:
    coef, intercept = np.asarray(model.coef_, dtype=np.float64), np.asarray(model.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:  # binary: a sigmoid equals a softmax over (-z/2, z/2)
        coef = np.vstack([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    return coef, intercept


def fit_judge(texts: Sequence[str], labels: Sequence[str], embeddings: np.ndarray, *, embedder: str,
              feature_set: str = "auto", c: float = 4.0, seed: int = 0) -> StyleJudge:
    """Fit the judge; ``feature_set='auto'`` keeps stylometric features only if 5-fold CV accuracy improves."""
    if feature_set not in ("auto", *FEATURE_SETS):
        raise ConfigError(f"{feature_set!r} is not one of 'auto', {', '.join(FEATURE_SETS)}", field="feature_set")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError(f"the judge needs answers of at least two personas, got {classes}", field="persona")
    y = np.array([classes.index(label) for label in labels])
    style = style_features(texts)
    mean, scale = style.mean(axis=0), style.std(axis=0)
    scale[scale == 0] = 1.0
    emb = np.asarray(embeddings, dtype=np.float64)
    z = np.clip((style - mean) / scale, -STYLE_CLIP, STYLE_CLIP)
    candidates = {"embedding": emb, "embedding+style": np.hstack([emb, z])}
    cv: dict[str, float] = {}
    if feature_set == "auto":
        cv = {name: _cv_accuracy(x, y, c=c, seed=seed) for name, x in candidates.items()}
        feature_set = "embedding+style" if cv["embedding+style"] > cv["embedding"] else "embedding"
        log.info("judge CV accuracy: %s -> %s", cv, feature_set)
    coef, intercept = _as_multiclass(_fit_lr(candidates[feature_set], y, c=c, seed=seed))
    meta = {"train_size": len(texts), "train_counts": {k: int((y == i).sum()) for i, k in enumerate(classes)},
            "cv_accuracy": cv, "C": c, "seed": seed}
    return StyleJudge(classes=tuple(classes), coef=coef, intercept=intercept, feature_set=feature_set,
                      style_mean=mean, style_scale=scale, embedder=embedder, meta=meta)


def _cv_accuracy(x: np.ndarray, y: np.ndarray, *, c: float, seed: int) -> float:
    from sklearn.model_selection import StratifiedKFold

    folds = min(5, int(np.bincount(y).min()))
    if folds < 2:
        return float("nan")
    correct = 0
    for train, test in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y):
        correct += int((_fit_lr(x[train], y[train], c=c, seed=seed).predict(x[test]) == y[test]).sum())
    return correct / len(y)


# --- evaluation ---------------------------------------------------------------------------------------------

def confusion(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> list[list[int]]:
    """Rows: true persona; columns: predicted persona; both in ``classes`` order."""
    index = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for t, p in zip(truth, predicted, strict=True):
        if t in index and p in index:
            matrix[index[t]][index[p]] += 1
    return matrix


def heldout_report(judge: StyleJudge, records: Sequence[QARecord], embed: Embed) -> dict[str, Any]:
    """The judge's accuracy on reference answers it never saw (the test split)."""
    known = [r for r in records if r.persona in judge.classes]
    if not known:
        return {"status": "skipped", "reason": "no held-out answers of the judge's personas"}
    texts = [r.answer for r in known]
    predicted = judge.predict(texts, embed(texts))
    truth = [r.persona for r in known]
    return {"status": "ok", "n": len(known), "accuracy": sum(p == t for p, t in zip(predicted, truth, strict=True))
            / len(known), "classes": list(judge.classes), "confusion": confusion(truth, predicted, judge.classes)}


def read_cochrane(folder: Path, *, limit: int) -> tuple[list[str], list[str], list[str]]:
    """Up to ``limit`` (source, target) pairs, test split first, then val; also which files were read."""
    sources: list[str] = []
    targets: list[str] = []
    used: list[str] = []
    for split in ("test", "val"):
        src, tgt = folder / f"{split}.source", folder / f"{split}.target"
        if not (src.is_file() and tgt.is_file()) or len(sources) >= limit:
            continue
        a = src.read_text(encoding="utf-8").splitlines()
        b = tgt.read_text(encoding="utf-8").splitlines()
        if len(a) != len(b):
            raise DataError(f"{len(a)} source lines but {len(b)} target lines", path=src)
        for s, t in zip(a, b, strict=True):
            if len(sources) >= limit:
                break
            if s.strip() and t.strip():
                sources.append(s.strip())
                targets.append(t.strip())
        used.append(split)
    return sources, targets, used


def cochrane_check(judge: StyleJudge, embed: Embed, *, folder: Path = COCHRANE_DIR, limit: int = 200,
                   technical: str = "clinician", lay: str = "general-reader") -> dict[str, Any]:
    """Can the judge tell Cochrane technical results (clinician register) from their plain-language summaries?"""
    if limit <= 0:
        return {"status": "skipped", "reason": "disabled (--cochrane-pairs 0)"}
    if not folder.is_dir():
        return {"status": "skipped", "reason": f"reference data folder {folder} is absent"}
    missing = [p for p in (technical, lay) if p not in judge.classes]
    if missing:
        return {"status": "skipped", "reason": f"the judge has no class {missing}; classes: {list(judge.classes)}"}
    sources, targets, used = read_cochrane(folder, limit=limit)
    if not sources:
        return {"status": "skipped", "reason": f"no .source/.target pairs in {folder}"}
    t, g = judge.classes.index(technical), judge.classes.index(lay)
    p_src = judge.predict_proba(sources, embed(sources))
    p_tgt = judge.predict_proba(targets, embed(targets))
    # Restricted to the two registers: which of the two classes is more probable.
    src_right = p_src[:, t] > p_src[:, g]
    tgt_right = p_tgt[:, g] > p_tgt[:, t]
    top_src = [judge.classes[i] for i in p_src.argmax(axis=1)]
    top_tgt = [judge.classes[i] for i in p_tgt.argmax(axis=1)]
    return {
        "status": "ok", "pairs": len(sources), "splits": used, "folder": str(folder),
        "pair_order_accuracy": float(np.mean(p_src[:, t] > p_tgt[:, t])),
        "two_class_accuracy": float((src_right.sum() + tgt_right.sum()) / (2 * len(sources))),
        "source_as_technical": float(src_right.mean()), "target_as_lay": float(tgt_right.mean()),
        "mean_p_technical_source": float(p_src[:, t].mean()), "mean_p_technical_target": float(p_tgt[:, t].mean()),
        "top_class_source": _counts(top_src), "top_class_target": _counts(top_tgt),
        "definition": f"pair_order_accuracy: share of pairs with P({technical}|source) > P({technical}|target); "
                      f"two_class_accuracy: share of all 2N texts whose more probable class of "
                      f"{{{technical}, {lay}}} is right (source={technical}, target={lay})",
    }


def _counts(labels: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for label in labels:
        out[label] = out.get(label, 0) + 1
    return dict(sorted(out.items()))


# --- cached fitting -------------------------------------------------------------------------------------------

def judge_key(records: Sequence[QARecord], embedder_fingerprint: str, *, c: float, seed: int) -> str:
    digest = hashlib.sha256(f"v{FEATURE_VERSION}|{embedder_fingerprint}|{c}|{seed}".encode())
    for r in sorted(records, key=lambda r: (r.persona, r.answer)):
        digest.update(f"\x1e{r.persona}\x1f{r.answer}".encode())
    return digest.hexdigest()[:16]


def train_judge(records: Sequence[QARecord], embed: Embed, *, embedder: str, embedder_fingerprint: str,
                exclude_answers: Sequence[str] = (), cache_dir: Path | None = None, c: float = 4.0,
                seed: int = 0) -> StyleJudge:
    """Fit (or load from ``cache_dir``) a judge on ``records`` minus any answer that is being evaluated."""
    excluded = set(exclude_answers)
    kept = [r for r in records if r.answer not in excluded]
    if len(kept) < len(records):
        log.warning("judge: left out %d training answers that are also evaluated items", len(records) - len(kept))
    key = judge_key(kept, embedder_fingerprint, c=c, seed=seed)
    folder = cache_dir / key if cache_dir is not None else None
    if folder is not None and (folder / "judge.json").is_file():
        try:
            judge = StyleJudge.load(folder)
        except DataError as exc:  # a damaged cache entry is refitted over, not an error on every later run
            log.warning("judge: the cached %s is unusable (%s); fitting it again", folder, exc)
        else:
            log.info("judge: using cached %s", folder)
            return judge
    texts = [r.answer for r in kept]
    judge = fit_judge(texts, [r.persona for r in kept], embed(texts), embedder=embedder, c=c, seed=seed)
    judge.meta["excluded_overlap"] = len(records) - len(kept)
    judge.meta["key"] = key
    if folder is not None:
        judge.save(folder)
    return judge
