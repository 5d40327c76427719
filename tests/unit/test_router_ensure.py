"""``ensure_router`` refits only what it may: routers fitted with the default settings. A router the user fitted
with their own data, embedder or backend is used as it is, and when stale it is refused, never overwritten."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from persona_router.core.errors import RouterModelError
from persona_router.core.records import RoutingRecord
from persona_router.router import fitting, persona_router
from persona_router.router.encoder import resolve_embedder
from persona_router.router.fitting import FitConfig, ensure_router, fit_router, fitted_with_defaults
from persona_router.router.persona_router import PersonaRouter

from tests.support.router_stub import StubEncoder, make_pack, records


@pytest.fixture
def custom_router(isolated_home: Path, tmp_path: Path) -> Path:
    """What ``fit-router --data utterances.jsonl`` leaves in the pack's default folder."""
    data = tmp_path / "utterances.jsonl"
    rows = [*records(), RoutingRecord(persona="alpha", question="alpha custom")]
    data.write_text("".join(json.dumps(r.to_json()) + "\n" for r in rows), encoding="utf-8")
    router = fit_router(make_pack(), rows, encoder=StubEncoder(), config=FitConfig(), data_files=[data]).router
    return router.save(isolated_home / "router" / "stubpack")


def no_default_fits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and make fast) any default fit ``ensure_router`` starts; the router's own encoder is the stub."""
    started: list[str] = []

    def build(model: object, backend: str) -> StubEncoder:
        started.append(backend)
        return StubEncoder()

    monkeypatch.setattr(fitting, "build_encoder", build)
    monkeypatch.setattr(persona_router, "_load_router_encoder", lambda folder, info: StubEncoder())
    return started


def test_a_stale_custom_router_is_refused_not_overwritten(custom_router: Path) -> None:
    before = (custom_router / "router.json").read_bytes()
    with pytest.raises(RouterModelError) as info:
        ensure_router(make_pack(extra_example="alpha new"), encoder=StubEncoder())  # the pack changed
    message = str(info.value)
    assert "changed personas" in message and "not refitted with the defaults" in message
    assert "fit-router --pack" in message and "--data" in message and "utterances.jsonl" in message
    assert message.count("refit it") == 1  # only the router's own command, not the generic one without --data
    assert (custom_router / "router.json").read_bytes() == before


def test_a_current_custom_router_is_used_with_its_own_embedder_and_backend(custom_router: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Fitted with another embedder (or on the torch backend while the default is onnx-int8): not stale."""
    started = no_default_fits(monkeypatch)
    before = (custom_router / "router.json").read_bytes()
    router = ensure_router(make_pack())  # default backend onnx-int8; the stub router ran on "torch"
    assert router.encoder.fingerprint == "sha256:stub" and router.info["default_settings"] is False
    router = ensure_router(make_pack(), encoder=StubEncoder("sha256:the-default-embedder"))
    assert router.encoder.fingerprint == "sha256:stub"
    assert started == [] and (custom_router / "router.json").read_bytes() == before


def test_a_stale_default_router_is_still_refitted(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = no_default_fits(monkeypatch)
    ensure_router(make_pack(), backend="torch")
    router_json = isolated_home / "router" / "stubpack" / "router.json"
    assert json.loads(router_json.read_text())["fit"]["default_settings"] is True
    ensure_router(make_pack(extra_example="alpha new"))
    assert started == ["torch", "onnx-int8"]


def test_an_unreadable_router_file_is_not_replaced_by_itself(isolated_home: Path) -> None:
    folder = isolated_home / "router" / "stubpack"
    folder.mkdir(parents=True)
    (folder / "router.json").write_text('{"format_version": 99}')
    with pytest.raises(RouterModelError, match="cannot tell how this router was fitted"):
        ensure_router(make_pack(), encoder=StubEncoder())
    assert (folder / "router.json").read_text() == '{"format_version": 99}'


def test_routers_saved_before_the_marker_are_judged_by_their_settings() -> None:
    legacy = {"embedder": {"id": "all-MiniLM-L6-v2"}, "classifier": {"kind": "logreg"},
              "calibration": {"target_precision": 0.9}, "fit": {"min_threshold": 0.5}}
    assert fitted_with_defaults(legacy)
    assert not fitted_with_defaults({**legacy, "embedder": {"id": "/models/mine"}})
    assert not fitted_with_defaults({**legacy, "calibration": {"target_precision": 0.8}})
    assert not fitted_with_defaults({**legacy, "fit": {"min_threshold": 0.5, "default_settings": False}})


def test_a_relative_embedder_folder_is_recorded_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--embedder ./my-model`` recorded verbatim could not be found from another working folder: the router
    was then stale and, through ensure_router, refitted with the default embedder over the user's."""
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    model_id, folder = resolve_embedder("./my-model")
    assert model_id == str(tmp_path / "my-model") and os.path.isabs(model_id) and folder.is_dir()
    monkeypatch.chdir("/")
    assert resolve_embedder(model_id)[1] == tmp_path / "my-model"


def test_fit_router_cli_records_whether_its_settings_are_the_defaults() -> None:
    from persona_router.cli.main import build_parser
    from persona_router.cli.route import _default_settings

    parser = build_parser()
    plain = parser.parse_args(["fit-router"])
    assert _default_settings(plain, FitConfig())
    for extra in (["--data", "x.jsonl"], ["--embedder", "./my-model"], ["--encoder-backend", "torch"]):
        assert not _default_settings(parser.parse_args(["fit-router", *extra]), FitConfig())
    assert not _default_settings(plain, FitConfig(target_precision=0.8))


def test_the_data_files_are_recorded_absolute(custom_router: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    loaded = PersonaRouter.load(custom_router, pack=make_pack(), encoder=StubEncoder())
    assert loaded.info["data"] == [str(tmp_path / "utterances.jsonl")] and not loaded.info["default_settings"]
