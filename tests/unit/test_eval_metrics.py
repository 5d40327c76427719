"""Metrics: ROUGE-L, readability, and the legacy notebook metrics against hand-computed values."""

from __future__ import annotations

import itertools

import pytest
from persona_router.eval.metrics import (
    count_syllables,
    flesch_kincaid_grade,
    legacy_char_jaccard,
    legacy_style_hit,
    legacy_style_lists,
    reference_range,
    rouge_l,
    sentence_count,
    text_metrics,
)

from tests.support import legacy_metrics


def demo_answers() -> list[str]:
    from persona_router.core.rows import demo_qa

    return [r.answer for r in demo_qa("train")] + [r.answer for r in demo_qa("test")]


def test_rouge_l_known_values() -> None:
    # LCS("the cat sat on the mat", "the cat lay on the mat") = the cat on the mat = 5 of 6 each side.
    score = rouge_l("the cat sat on the mat", "The cat lay on the mat.")
    assert score.precision == pytest.approx(5 / 6)
    assert score.recall == pytest.approx(5 / 6)
    assert score.f1 == pytest.approx(5 / 6)
    # Unequal lengths: pred 2 tokens, ref 4 tokens, LCS 2 -> P=1, R=0.5, F1=2/3.
    score = rouge_l("police killed", "police killed the gunman")
    assert (score.precision, score.recall, score.f1) == pytest.approx((1.0, 0.5, 2 / 3))
    assert rouge_l("a b c", "a b c").f1 == 1.0
    assert rouge_l("x y", "a b").f1 == 0.0
    assert rouge_l("", "a b").f1 == 0.0
    assert legacy_metrics.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example


def test_rouge_score_equals_the_former_hand_written_rouge_l_on_demo_answers() -> None:
    """rouge-score (no stemming) against the LCS implementation it replaced: tolerance 1e-12 (measured: 0)."""
    answers = demo_answers()
    pairs = list(itertools.pairwise(answers))[::2]
    assert len(pairs) > 200
    for prediction, reference in pairs:
        new = rouge_l(prediction, reference)
        assert (new.precision, new.recall, new.f1) == pytest.approx(
            legacy_metrics.rouge_l(prediction, reference), abs=1e-12)


def test_numpy_quantiles_equal_the_former_hand_written_ones() -> None:
    grades = sorted(g for g in (flesch_kincaid_grade(t) for t in demo_answers()[:200]) if g is not None)
    rng = reference_range(demo_answers()[:200])
    assert rng is not None
    expected = [legacy_metrics.quantile(grades, q) for q in (0.1, 0.5, 0.9)]
    assert [rng.low, rng.median, rng.high] == pytest.approx(expected, abs=1e-12)


def test_syllables_and_flesch_kincaid() -> None:
    expected = {"cat": 1, "the": 1, "table": 2, "make": 1, "syllable": 3, "readability": 5, "beautiful": 3,
                "jumped": 1, "wanted": 2, "boxes": 2, "yes": 1, "free": 1, "": 0}
    assert {w: count_syllables(w) for w in expected} == expected
    # 2 sentences, 6 words, 6 syllables: 0.39*3 + 11.8*1 - 15.59 = -2.62
    assert flesch_kincaid_grade("The cat sat. The dog ran.") == pytest.approx(0.39 * 3 + 11.8 - 15.59)
    assert flesch_kincaid_grade("   ") is None
    assert sentence_count("One. Two! Three?") == 3
    assert sentence_count("Intro:\n- first item\n- second item") == 3
    assert sentence_count("no ending") == 1


def test_reference_range_and_gap() -> None:
    texts = ["The cat sat. The dog ran.", "Photosynthesis converts electromagnetic radiation into chemical energy.",
             "It is hot."]
    rng = reference_range(texts)
    assert rng is not None and rng.n == 3 and rng.low <= rng.median <= rng.high
    assert rng.gap(rng.median) == 0.0
    assert rng.gap(rng.high + 2.0) == pytest.approx(2.0)
    assert reference_range(["", "  "]) is None


def test_legacy_overlap_matches_hand_computation() -> None:
    # set("abc") & set("bcd") = {b, c}; union = {a, b, c, d} -> 0.5
    assert legacy_char_jaccard("abc", "bcd") == 0.5
    # lowercased first: "Hi" -> {h, i}; "hit" -> {h, i, t} -> 2/3
    assert legacy_char_jaccard("Hi", "hit") == pytest.approx(2 / 3)
    assert legacy_char_jaccard("", "") == 0.0
    # Any two English sentences overlap a lot: the metric barely depends on meaning.
    unrelated = legacy_char_jaccard("The mitochondria produce energy for the cell through respiration.",
                                    "Interest rates rise when central banks tighten monetary policy.")
    assert unrelated > 0.7


def test_legacy_style_hit_matches_the_notebook_rules() -> None:
    assert legacy_style_lists("general-reader") == ("explanatory", "educational", "reasoning")
    assert legacy_style_lists("computer science students") == ("explanatory", "educational", "reasoning")
    assert legacy_style_lists("engineer") == ("technical", "educational")
    assert legacy_style_lists("educator") == ("educational", "reasoning")
    assert legacy_style_lists("clinician") == ("explanatory", "technical", "educational", "reasoning")
    # "note" inside "denote" counts, exactly as the substring test did.
    assert legacy_style_hit("student", "Let x denote the mass.") == 1.0
    assert legacy_style_hit("student", "The sky is blue.") == 0.0
    # "system" is technical: a hit for engineers, not for educators.
    assert legacy_style_hit("engineer", "A system.") == 1.0
    assert legacy_style_hit("educator", "A system.") == 0.0
    assert legacy_style_hit("clinician", "A system.") == 1.0


def test_text_metrics_fields() -> None:
    rng = reference_range(["The cat sat. The dog ran."])
    row = text_metrics("The cat sat. The dog ran.", "The cat sat.", "student", rng)
    assert row["readability_in_range"] == 1.0 and row["readability_gap"] == 0.0
    assert row["length_words"] == 6.0
    assert set(row) == {"rouge_l_f1", "readability_grade", "readability_in_range", "readability_gap",
                        "length_words", "legacy_style_hit", "legacy_char_jaccard"}
    assert text_metrics("The cat sat.", "ref", "student", None)["readability_in_range"] is None  # no range


@pytest.mark.parametrize("answer", ["", "   ", "... !!! ---", "答案。"])
def test_an_answer_without_words_is_out_of_range(answer: str) -> None:
    """An empty answer (immediate end-of-sequence) has no grade: it is not in range, rather than absent from
    the comparison; its gap has no honest value and stays None (the comparison counts the dropped pair)."""
    row = text_metrics(answer, "ref", "student", reference_range(["The cat sat. The dog ran."]))
    assert row["readability_grade"] is None
    assert row["readability_in_range"] == 0.0
    assert row["readability_gap"] is None
