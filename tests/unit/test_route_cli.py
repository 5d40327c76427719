"""``persona-router route`` with a router fitted for the user's own pack: the router's pack is used, every input
row is checked before a decision is printed, and errors name the line or argument."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from persona_router.cli.main import main
from persona_router.core.pack import load_pack
from persona_router.core.pack_edit import dumps_toml
from persona_router.router import persona_router
from persona_router.router.fitting import FitConfig, fit_router

from tests.support.router_stub import StubEncoder, make_pack, records


@pytest.fixture
def my_router(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``fit-router --pack my.toml --out ./my-router``, with the stub embedder standing in for MiniLM."""
    pack_file = tmp_path / "my.toml"
    pack_file.write_text(dumps_toml({"name": "stubpack", "personas": [p.to_json() for p in make_pack().personas]}),
                         encoding="utf-8")
    pack = load_pack(str(pack_file))
    router = fit_router(pack, records(), encoder=StubEncoder(), config=FitConfig(repeats=1)).router
    monkeypatch.setattr(persona_router, "_load_router_encoder", lambda folder, info: StubEncoder())
    return router.save(tmp_path / "my-router")


def test_route_with_router_uses_the_pack_it_was_fitted_for(my_router: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's example: without --pack, the default (demo) pack refused every router of another pack."""
    assert main(["route", "--json", "--router", str(my_router), "alpha alpha", "beta beta"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["persona"] for p in printed] == ["alpha", "beta"]


def test_route_with_another_pack_says_so_plainly(my_router: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "--router", str(my_router), "--pack", "demo", "why is the sky blue?"]) == 2
    err = capsys.readouterr().err
    assert "fitted for pack 'stubpack'" in err and "not for pack 'demo'" in err and "leave out" in err
    assert "changed personas" not in err


def test_every_row_is_checked_before_anything_is_printed(my_router: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown persona on line 300 failed after 256 decisions had been printed, without a line number."""
    rows = [{"question": f"alpha question {i}"} for i in range(299)] + [{"question": "q", "persona": "delta"}]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert main(["route", "--json", "--router", str(my_router), "--input", str(questions)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{questions}:300" in captured.err and "unknown persona 'delta'" in captured.err
    assert "valid personas: alpha, beta, gamma" in captured.err
    questions.write_text(json.dumps({"question": "alpha"}) + "\n" + json.dumps({"question": "  "}) + "\n",
                         encoding="utf-8")
    assert main(["route", "--json", "--router", str(my_router), "--input", str(questions)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"{questions}:2: field 'question': must be a non-empty string" in captured.err


def test_blank_or_misnamed_arguments_are_named(my_router: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "--router", str(my_router), "alpha", "   "]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "QUESTION argument 2" in captured.err
    assert main(["route", "--router", str(my_router), "--persona", "delta", "alpha"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "'--persona'" in captured.err and "unknown persona 'delta'" in captured.err
