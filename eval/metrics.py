"""Per-item metrics of one answer against the reference answer and the asking persona.

Current metrics measure what the project is about (does the answer sound like the persona, and does it
still say what the reference says): the style judge's probability for the persona, embedding cosine to
the reference, ROUGE-L, Flesch-Kincaid grade against the persona's reference range, length and latency.

The two ``legacy_*`` metrics reproduce the original notebook's numbers exactly as it computed them (see
``NOTEBOOK_FACTS.md``) so results can sit beside its published 67.0% / 51.7%. They do not measure persona
adaptation: the keyword test fires on almost any long English text and never compares personas, and the
character-set Jaccard index is near its ceiling for any two English paragraphs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from persona_router.core.errors import ConfigError

HIGHER, LOWER, NEUTRAL = "higher", "lower", "none"


@dataclass(frozen=True)
class MetricInfo:
    name: str
    direction: str  # which way is better: "higher", "lower", or "none" (descriptive only)
    description: str
    legacy: bool = False


METRICS: tuple[MetricInfo, ...] = (
    MetricInfo("judge_adherence", HIGHER, "style judge's probability that the answer is the persona's"),
    MetricInfo("judge_hit", HIGHER, "1 when the style judge's top persona is the asking persona"),
    MetricInfo("embedding_cosine", HIGHER, "cosine similarity of answer and reference embeddings"),
    MetricInfo("rouge_l_f1", HIGHER, "ROUGE-L F1 (longest common word subsequence) against the reference"),
    MetricInfo("readability_in_range", HIGHER,
               "1 when the Flesch-Kincaid grade is inside the persona's reference range (train answers p10-p90); "
               "0 for an answer without words (no grade)"),
    MetricInfo("readability_gap", LOWER, "grade levels outside the persona's reference range (0 inside); none for "
               "an answer without words, whose pair is dropped and counted"),
    MetricInfo("readability_grade", NEUTRAL, "Flesch-Kincaid grade level"),
    MetricInfo("length_words", NEUTRAL, "answer length in words"),
    MetricInfo("latency_s", LOWER, "generation wall time in seconds"),
    MetricInfo("legacy_style_hit", HIGHER, "LEGACY notebook 'persona-style hit rate' (keyword substring test)",
               legacy=True),
    MetricInfo("legacy_char_jaccard", HIGHER, "LEGACY notebook 'semantic overlap' (Jaccard of character sets)",
               legacy=True),
)

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n\s*\n|\n\s*(?=[-*•]|\d+[.)])")


# --- ROUGE-L -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RougeL:
    precision: float
    recall: float
    f1: float


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise ConfigError("ROUGE-L needs rouge-score: pip install rouge-score", field="rouge_l_f1") from exc
    # Google's reference implementation with its standard tokenisation (lowercase, alphanumeric tokens) and no
    # stemming, as Hugging Face ``evaluate``'s rouge defaults to. Without stemming the scores equal those of
    # the hand-written LCS this replaced (0 difference over 499 pairs of demo answers,
    # tests/unit/test_eval_metrics.py), so committed reports stay comparable; Porter stemming would move
    # F1 by up to 0.027 on the same pairs.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> RougeL:
    """ROUGE-L of ``prediction`` against ``reference`` (``rouge-score``)."""
    score = _rouge_scorer().score(reference, prediction)["rougeL"]  # score(target, prediction)
    return RougeL(float(score.precision), float(score.recall), float(score.fmeasure))


# --- readability -----------------------------------------------------------------------------------------

def count_syllables(word: str) -> int:
    """Heuristic English syllable count: vowel groups after dropping a silent final e / -es / -ed."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if not w:
        return 0
    if len(w) <= 3:
        return 1
    if w.endswith("e") and not w.endswith(("le", "ee", "ye")):
        w = w[:-1]  # silent e: make, place (but table, free)
    elif w.endswith("ed") and w[-3] not in "td":
        w = w[:-2]  # jumped (but wanted)
    elif w.endswith("es") and w[-3] not in "sxzchg":
        w = w[:-2]  # makes (but boxes, places)
    if w.startswith("y"):
        w = w[1:]  # consonant y: yes, year
    return max(1, len(re.findall(r"[aeiouy]+", w)))


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentence_count(text: str) -> int:
    """Sentences: runs ending in . ! ? before whitespace, blank lines, and list items."""
    pieces = [p for p in _SENTENCE_END.split(text) if _WORD.search(p)]
    return max(1, len(pieces))


def flesch_kincaid_grade(text: str) -> float | None:
    """0.39 * words/sentence + 11.8 * syllables/word - 15.59; None for text without words.

    Kept rather than ``textstat`` (0.7.13, the current release): for English it counts syllables with NLTK's
    CMU dictionary, which it downloads from GitHub on first use (``nltk.download('cmudict')``). Offline that
    raises ``LookupError`` (tried here: no network), and in a server it would be a network call in the
    middle of scoring. The style judge also uses this grade and ``count_syllables`` as features, and its
    cached models are keyed to them.
    """
    tokens = words(text)
    if not tokens:
        return None
    syllables = sum(count_syllables(t) for t in tokens)
    return 0.39 * len(tokens) / sentence_count(text) + 11.8 * syllables / len(tokens) - 15.59


@dataclass(frozen=True)
class ReferenceRange:
    """A persona's typical readability grade, from its training answers (10th to 90th percentile)."""

    low: float
    high: float
    median: float
    n: int

    def gap(self, value: float) -> float:
        return max(0.0, self.low - value, value - self.high)

    def to_json(self) -> dict[str, float | int]:
        return {"low": self.low, "high": self.high, "median": self.median, "n": self.n}


def reference_range(texts: Sequence[str], *, low_q: float = 0.10, high_q: float = 0.90) -> ReferenceRange | None:
    import numpy as np

    grades = [g for g in (flesch_kincaid_grade(t) for t in texts) if g is not None]
    if not grades:
        return None
    low, median, high = (float(v) for v in np.quantile(grades, [low_q, 0.5, high_q]))  # linear interpolation
    return ReferenceRange(low=low, high=high, median=median, n=len(grades))


# --- legacy metrics, exactly as the original notebook computed them ----------------------------------------

LEGACY_WORDS: dict[str, tuple[str, ...]] = {
    "explanatory": ("because", "that's why", "for example", "such as", "this means", "in other words", "simply",
                    "basically", "refers to"),
    "technical": ("optimization", "implementation", "methodology", "framework", "algorithm", "protocol",
                  "mechanism", "architecture", "analysis", "procedure", "technique", "approach", "system",
                  "process"),
    "educational": ("important", "key", "note", "consider", "understand", "demonstrates", "indicates", "suggests",
                    "means", "allows"),
    "reasoning": ("when", "while", "although", "however", "therefore", "thus", "consequently", "due to",
                  "in order to"),
}


def legacy_style_lists(persona: str) -> tuple[str, ...]:
    """Which word lists count as a hit for a persona label, in the notebook's order of tests."""
    label = persona.lower()
    if any(key in label for key in ("student", "general", "readers")):
        return ("explanatory", "educational", "reasoning")
    if any(key in label for key in ("scientist", "professional", "computer", "researcher", "engineer")):
        return ("technical", "educational")
    if any(key in label for key in ("educator", "teacher")):
        return ("educational", "reasoning")
    return tuple(LEGACY_WORDS)


def legacy_style_hit(persona: str, prediction: str) -> float:
    """The notebook's 'persona-style hit': 1.0 if any word of the persona's lists is a substring."""
    text = prediction.lower()
    return float(any(word in text for name in legacy_style_lists(persona) for word in LEGACY_WORDS[name]))


def legacy_char_jaccard(prediction: str, truth: str) -> float:
    """The notebook's 'semantic overlap': Jaccard index of the two texts' sets of distinct characters.

    The notebook divided by zero when both texts were empty; that case is 0.0 here.
    """
    pred, ref = set(prediction.lower()), set(truth.lower())
    union = pred | ref
    return len(pred & ref) / len(union) if union else 0.0


# --- one item ---------------------------------------------------------------------------------------------

def text_metrics(prediction: str, reference: str, persona: str,
                 grade_range: ReferenceRange | None) -> dict[str, float | None]:
    """The metrics that need only the two texts (no embeddings, no judge, no timing)."""
    grade = flesch_kincaid_grade(prediction)
    in_range, gap = readability_against(grade, grade_range)
    return {
        "rouge_l_f1": rouge_l(prediction, reference).f1,
        "readability_grade": grade,
        "readability_in_range": in_range,
        "readability_gap": gap,
        "length_words": float(len(words(prediction))),
        "legacy_style_hit": legacy_style_hit(persona, prediction),
        "legacy_char_jaccard": legacy_char_jaccard(prediction, reference),
    }


def readability_against(grade: float | None, grade_range: ReferenceRange | None) -> tuple[float | None, float | None]:
    """(in range, gap) of a grade against the persona's range; both None without a range.

    An answer without words (empty: an immediate end-of-sequence, a typical broken-adapter symptom) has no
    grade. It is not in range (0), so it counts against its arm instead of leaving the comparison. Its gap
    stays None: any number of grade levels would be invented, and the comparison counts the pair it drops.
    """
    if grade_range is None:
        return None, None
    if grade is None:
        return 0.0, None
    gap = grade_range.gap(grade)
    return float(gap == 0.0), gap


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
