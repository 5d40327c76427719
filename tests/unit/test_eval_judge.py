"""The style judge: numpy prediction equals sklearn's, a pickle-free round trip, held-out and Cochrane reports."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from persona_router.core.records import QARecord
from persona_router.eval.judge import StyleJudge, cochrane_check, confusion, fit_judge, heldout_report, train_judge

PERSONAS = ("clinician", "general-reader", "student")


def fake_embed(texts: Sequence[str]) -> np.ndarray:
    """Deterministic bag-of-words hashing embedding (unit rows), standing in for MiniLM."""
    out = np.zeros((len(texts), 32))
    for i, text in enumerate(texts):
        for word in text.lower().split():
            out[i, sum(map(ord, word)) % 32] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms == 0, 1.0, norms)


STYLE = {
    "clinician": "Dose 5 mg (IV); monitor QTc: contraindicated in CrCl < 30 per trial evidence {i}.",
    "general-reader": "It is a simple idea really and most people find it easy to follow {i}.",
    "student": "Imagine you have a box of toys, you can think of it like this, okay {i}?",
}


def records(n: int) -> list[QARecord]:
    return [QARecord(persona=p, question=f"q{i}", answer=STYLE[p].format(i=i)) for p in PERSONAS for i in range(n)]


def test_numpy_probabilities_equal_sklearn_and_round_trip(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    train = records(12)
    texts = [r.answer for r in train]
    judge = fit_judge(texts, [r.persona for r in train], fake_embed(texts), embedder="fake", feature_set="embedding",
                      c=4.0)
    reference = LogisticRegression(C=4.0, max_iter=5000, random_state=0).fit(
        fake_embed(texts), [sorted(PERSONAS).index(r.persona) for r in train])
    np.testing.assert_allclose(judge.predict_proba(texts, fake_embed(texts)),
                               reference.predict_proba(fake_embed(texts)), atol=1e-10)
    judge.save(tmp_path / "judge")
    assert sorted(p.name for p in (tmp_path / "judge").iterdir()) == ["judge.json", "judge.npz"]
    loaded = StyleJudge.load(tmp_path / "judge")  # np.load(allow_pickle=False) inside
    assert loaded.classes == judge.classes and loaded.feature_set == "embedding"
    np.testing.assert_array_equal(loaded.predict_proba(texts, fake_embed(texts)),
                                  judge.predict_proba(texts, fake_embed(texts)))


def test_binary_judge_matches_sklearn_sigmoid() -> None:
    from sklearn.linear_model import LogisticRegression

    train = [r for r in records(10) if r.persona != "student"]
    texts = [r.answer for r in train]
    labels = [r.persona for r in train]
    judge = fit_judge(texts, labels, fake_embed(texts), embedder="fake", feature_set="embedding")
    reference = LogisticRegression(C=4.0, max_iter=5000, random_state=0).fit(fake_embed(texts), labels)
    np.testing.assert_allclose(judge.predict_proba(texts, fake_embed(texts)),
                               reference.predict_proba(fake_embed(texts)), atol=1e-10)


def test_auto_feature_set_and_heldout_accuracy(tmp_path: Path) -> None:
    judge = train_judge(records(10), fake_embed, embedder="fake", embedder_fingerprint="sha256:x",
                        cache_dir=tmp_path, exclude_answers=[STYLE["student"].format(i=0)])
    assert judge.feature_set in ("embedding", "embedding+style")
    assert set(judge.meta["cv_accuracy"]) == {"embedding", "embedding+style"}
    assert judge.meta["excluded_overlap"] == 1  # an evaluated item's answer is never trained on
    report = heldout_report(judge, [QARecord(persona=p, question="q", answer=STYLE[p].format(i=99))
                                    for p in PERSONAS], fake_embed)
    assert report["status"] == "ok" and report["n"] == 3 and report["accuracy"] == 1.0
    cached = train_judge(records(10), fake_embed, embedder="fake", embedder_fingerprint="sha256:x",
                         cache_dir=tmp_path, exclude_answers=[STYLE["student"].format(i=0)])
    assert cached.meta["key"] == judge.meta["key"]
    (tmp_path / judge.meta["key"] / "judge.npz").write_bytes(b"cut short")  # a damaged cache entry
    refitted = train_judge(records(10), fake_embed, embedder="fake", embedder_fingerprint="sha256:x",
                           cache_dir=tmp_path, exclude_answers=[STYLE["student"].format(i=0)])
    np.testing.assert_allclose(refitted.coef, judge.coef)
    assert StyleJudge.load(tmp_path / judge.meta["key"]).meta["key"] == judge.meta["key"]  # saved again


def test_confusion_rows_are_truth() -> None:
    assert confusion(["a", "a", "b"], ["a", "b", "b"], ["a", "b"]) == [[1, 1], [0, 1]]


def test_cochrane_check_reads_pairs_and_skips_cleanly(tmp_path: Path) -> None:
    train = records(10)
    texts = [r.answer for r in train]
    judge = fit_judge(texts, [r.persona for r in train], fake_embed(texts), embedder="fake", feature_set="embedding")
    absent = cochrane_check(judge, fake_embed, folder=tmp_path / "missing")
    assert absent["status"] == "skipped" and "absent" in absent["reason"]
    folder = tmp_path / "cochrane"
    folder.mkdir()
    (folder / "test.source").write_text("\n".join(STYLE["clinician"].format(i=i) for i in range(4)) + "\n")
    (folder / "test.target").write_text("\n".join(STYLE["general-reader"].format(i=i) for i in range(4)) + "\n")
    result = cochrane_check(judge, fake_embed, folder=folder, limit=3)
    assert result["status"] == "ok" and result["pairs"] == 3 and result["splits"] == ["test"]
    assert result["pair_order_accuracy"] == 1.0 and result["two_class_accuracy"] == 1.0
    assert cochrane_check(judge, fake_embed, folder=folder, limit=0)["status"] == "skipped"


def test_real_cochrane_data_is_readable(shared_data: Path) -> None:
    from persona_router.eval.judge import read_cochrane

    sources, targets, used = read_cochrane(shared_data / "cochrane_plain_language", limit=1000)
    assert len(sources) == len(targets) == 891 and used == ["test", "val"]
