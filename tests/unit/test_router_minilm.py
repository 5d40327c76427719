"""The router with the real offline MiniLM embedder: held-out quality, abstention, robustness, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from persona_router.cli.main import main
from persona_router.core.errors import InvalidRequestError, RouterModelError
from persona_router.core.pack import load_pack
from persona_router.core.rows import demo_routing
from persona_router.router.encoder import Encoder, load_encoder
from persona_router.router.fitting import FitConfig, evaluate, fit_router
from persona_router.router.persona_router import PersonaRouter

NONSENSE = ["asdf qwerty", "🤔🤔🤔", "lorem ipsum dolor sit amet", "ok"]
ODD_INPUTS = [
    "x" * 50_000,
    "why " * 5_000,
    "🧬🔬 how do vaccines work?? 💉💉",
    "¿Cómo funciona la fotosíntesis?",
    "光合作用是什么？",
    "ما هو التضخم؟",
    "<script>alert('hi')</script><b>dose of amoxicillin?</b>",
    "# Title\n\n* **bold** `code` [link](http://x)",
    "tab\tand\x00nul and \u202eright-to-left override",
]


@pytest.fixture(scope="session")
def minilm() -> Encoder:
    return load_encoder(None)


@pytest.fixture(scope="session")
def demo_router(minilm: Encoder) -> PersonaRouter:
    return fit_router(load_pack("demo"), demo_routing("train"), encoder=minilm, config=FitConfig()).router


@pytest.fixture(scope="session")
def saved_router(demo_router: PersonaRouter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_router.save(tmp_path_factory.mktemp("router") / "demo")


def test_encoder_is_normalised_and_truncates_to_its_limit(minilm: Encoder) -> None:
    assert minilm.max_seq_length == 256 and minilm.fingerprint.startswith("sha256:")
    head = "what is the renal dose of apixaban " * 60  # far beyond 256 tokens
    vectors = minilm.encode([head + "tail one", head + "a completely different ending about kittens"])
    assert vectors.shape == (2, minilm.dimension)
    assert abs(float((vectors[0] ** 2).sum()) - 1) < 1e-5
    assert float(vectors[0] @ vectors[1]) > 0.99999


def test_held_out_macro_f1_meets_the_goal(demo_router: PersonaRouter) -> None:
    report = evaluate(demo_router, demo_routing("test"), title="held-out")
    assert report.n == 150 and report.macro_f1 >= 0.85, report.to_markdown()
    assert report.inferred_precision is not None and report.inferred_precision >= 0.85


def test_nonsense_falls_back_with_a_reason(demo_router: PersonaRouter) -> None:
    fallback = demo_router.pack.fallback.name
    for question in NONSENSE:
        decision = demo_router.decide(question)
        assert decision.persona == fallback and decision.source == "fallback", (question, decision)
        assert decision.reason and "threshold" in decision.reason


def test_a_clear_question_is_inferred(demo_router: PersonaRouter) -> None:
    decision = demo_router.decide("renal dose adjustment of enoxaparin for CrCl under 30 mL/min?")
    assert (decision.persona, decision.source, decision.reason) == ("clinician", "inferred", None)
    assert decision.confidence >= demo_router.calibration.thresholds["clinician"]


def test_same_question_same_decision(demo_router: PersonaRouter) -> None:
    questions = [r.question for r in demo_routing("test")[:12]]
    single = [demo_router.decide(q) for q in questions]
    assert single == [demo_router.decide(q) for q in questions]
    # Batches pad to their longest member, which moves float sums by ~1e-7: same choices, same scores to 1e-5.
    for batch in (demo_router.decide_batch(questions), demo_router.decide_batch(questions[::-1])[::-1]):
        for one, other in zip(single, batch, strict=True):
            assert (one.persona, one.source, one.runner_up) == (other.persona, other.source, other.runner_up)
            assert one.confidence == pytest.approx(other.confidence, abs=1e-5)


@pytest.mark.parametrize("question", ODD_INPUTS, ids=lambda q: repr(q[:12]))
def test_odd_inputs_get_a_decision(demo_router: PersonaRouter, question: str) -> None:
    decision = demo_router.decide(question)
    assert decision.persona in demo_router.pack and decision.source in ("inferred", "fallback")
    json.dumps(decision.to_json())


def test_empty_question_is_a_clear_error(demo_router: PersonaRouter) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        demo_router.decide(" \n ")


def test_round_trip_and_refusals_on_disk(saved_router: Path, demo_router: PersonaRouter, minilm: Encoder) -> None:
    loaded = PersonaRouter.load(saved_router)  # pack and embedder found from router.json
    questions = [r.question for r in demo_routing("test")[:10]]
    assert loaded.decide_batch(questions) == demo_router.decide_batch(questions)
    description = json.loads((saved_router / "router.json").read_text())
    assert description["embedder"]["fingerprint"] == minilm.fingerprint and description["pack"]["source"] == "demo"

    edited = {**description, "embedder": {**description["embedder"], "fingerprint": "sha256:" + "0" * 64}}
    (saved_router.parent / "edited").mkdir()
    for name in ("classifier.safetensors",):
        (saved_router.parent / "edited" / name).write_bytes((saved_router / name).read_bytes())
    (saved_router.parent / "edited" / "router.json").write_text(json.dumps(edited))
    with pytest.raises(RouterModelError, match=r"fitted with embedder .* refit"):
        PersonaRouter.load(saved_router.parent / "edited", encoder=minilm)

    pack = load_pack("demo")
    student = pack.get("student")
    changed = replace(pack, personas=tuple(replace(p, examples=(*p.examples, "one more")) if p is student else p
                                           for p in pack.personas))
    with pytest.raises(RouterModelError, match="changed personas"):
        PersonaRouter.load(saved_router, pack=changed, encoder=minilm)


def test_route_cli_keeps_file_order(saved_router: Path, demo_router: PersonaRouter, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"question": r.question} for r in demo_routing("test")[:7]]
    rows.insert(3, {"question": "anything at all", "persona": "engineer"})
    rows.append({"question": "why is the sky blue? 🌌"})
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    assert main(["route", "--input", str(path), "--json", "--router", str(saved_router), "--batch-size", "3"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["question"] for p in printed] == [r["question"] for r in rows]
    assert printed[3]["persona"] == "engineer" and printed[3]["source"] == "explicit"
    expected = demo_router.decide_batch([r["question"] for r in rows], [r.get("persona") for r in rows])
    assert [(p["persona"], p["source"]) for p in printed] == [(d.persona, d.source) for d in expected]

    path.write_text('{"question": "fine"}\n{"question": "  "}\n', encoding="utf-8")
    assert main(["route", "--input", str(path), "--router", str(saved_router)]) == 2
    assert f"{path}:2" in capsys.readouterr().err


def test_fit_router_cli_writes_router_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r.to_json()) + "\n" for r in demo_routing("train")[::8]), encoding="utf-8")
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r.to_json()) + "\n" for r in demo_routing("test")[::10]), encoding="utf-8")
    out = tmp_path / "router"
    code = main(["fit-router", "--data", str(train), "--test", str(test), "--out", str(out),
                 "--classifier", "centroid", "--target-precision", "0.8"])
    assert code == 0
    assert "held-out test" in capsys.readouterr().out
    for name in ("router.json", "classifier.safetensors", "report.md", "report.json", "confusion.png"):
        assert (out / name).is_file(), name
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    description = json.loads((out / "router.json").read_text())
    assert description["classifier"]["kind"] == "centroid"
    assert description["calibration"]["target_precision"] == 0.8
    assert main(["route", "--router", str(out), "--json", "what is a hash map"]) == 0
    assert json.loads(capsys.readouterr().out)["persona"] in load_pack("demo")
