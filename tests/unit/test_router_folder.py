"""The router folder on disk: what a save may replace, which temps it sweeps, and loads that overlap a save."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from persona_router.cli.main import main
from persona_router.core import atomic
from persona_router.core.atomic import atomic_dir, exchange_paths
from persona_router.core.errors import RouterModelError
from persona_router.core.records import RoutingRecord
from persona_router.router import persona_router
from persona_router.router.fitting import FitConfig, fit_router
from persona_router.router.persona_router import PersonaRouter

from tests.support.router_stub import StubEncoder, make_pack, records

QUESTIONS = ["alpha why", "beta how is", "gamma", "what of the"]


@pytest.fixture(scope="module")
def routers() -> tuple[PersonaRouter, PersonaRouter]:
    """Two routers of one pack whose weights and calibration differ."""
    first = fit_router(make_pack(), records(), encoder=StubEncoder(), config=FitConfig(repeats=1)).router
    more = [*records(), *(RoutingRecord(persona="beta", question=f"alpha beta {i}") for i in range(6))]
    second = fit_router(make_pack(), more, encoder=StubEncoder(), config=FitConfig(repeats=1)).router
    assert first.calibration != second.calibration
    return first, second


def test_a_save_refuses_a_folder_that_is_not_a_router(routers: tuple[PersonaRouter, PersonaRouter],
                                                      tmp_path: Path) -> None:
    """Saving swaps the whole folder out and deletes it: ``--out ~/Documents`` must not delete Documents."""
    router = routers[0]
    precious = tmp_path / "documents"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(RouterModelError, match="not a router folder"):
        router.save(precious)
    assert (precious / "thesis.tex").read_text() == "years of work"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(RouterModelError, match="not a folder"):
        router.save(a_file)
    assert a_file.read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    router.save(empty)  # an empty folder, then a router folder, are replaced
    router.save(empty)
    assert PersonaRouter.load(empty, pack=make_pack(), encoder=StubEncoder()).calibration == router.calibration


def test_fit_router_refuses_such_an_out_before_fitting(tmp_path: Path, isolated_home: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "main.py").write_text("print('hi')")
    assert main(["fit-router", "--out", str(precious)]) == 2
    err = capsys.readouterr().err
    assert "'--out'" in err and "not a router folder" in err
    assert (precious / "main.py").read_text() == "print('hi')"


def test_a_save_sweeps_only_its_own_stale_temps(routers: tuple[PersonaRouter, PersonaRouter],
                                                tmp_path: Path) -> None:
    """Pack names may hold '-': the save of pack ``stubpack`` must leave pack ``stubpack-v2``'s temp (a save
    that may be running) alone, and still remove its own crash leftovers."""
    other = tmp_path / ".tmp-stubpack-v2-0a1b2c3d"
    other.mkdir()
    (other / "router.json").write_text("{}")
    mine = tmp_path / ".tmp-stubpack-deadbeef"
    mine.mkdir()
    routers[0].save(tmp_path / "stubpack")
    assert other.is_dir() and not mine.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".stubpack.lock", ".tmp-stubpack-v2-0a1b2c3d", "stubpack"]


def swapped(folder: Path) -> bool:
    """Whether two folders made here swap (False: no renameat2(RENAME_EXCHANGE) on this system or file system)."""
    first, second = folder / "a", folder / "b"
    for path in (first, second):
        path.mkdir()
        (path / "which").write_text(path.name)
    done = exchange_paths(first, second)
    assert (first / "which").read_text() == ("b" if done else "a")
    assert (second / "which").read_text() == ("a" if done else "b")
    return done


def test_exchange_swaps_two_folders_in_one_step(tmp_path: Path) -> None:
    if not swapped(tmp_path):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or file system")


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_replacing_a_folder_never_leaves_it_missing_where_it_can(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                exchange: bool) -> None:
    """A reader must find the old folder or the new one; with two renames there was a moment with neither.
    Without an exchange (other systems) the two renames still replace it and leave no temp behind."""
    if exchange:
        (tmp_path / "probe").mkdir()
        if not swapped(tmp_path / "probe"):
            pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or file system")
    target = tmp_path / "router"
    target.mkdir()
    (target / "version").write_text("old")
    if not exchange:
        monkeypatch.setattr(atomic, "exchange_paths", lambda first, second: False)
    missing: list[str] = []
    real_rename = os.rename

    def watched_rename(source: object, destination: object) -> None:
        real_rename(source, destination)  # type: ignore[arg-type]
        if not target.exists():
            missing.append(f"{source} -> {destination}")

    monkeypatch.setattr(os, "rename", watched_rename)
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "version").write_text("new")
    assert (target / "version").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "probe") == ["router"]
    if exchange:
        assert missing == []
    else:
        assert missing  # the fallback's moment without a folder, which the exchange removes


def test_a_load_that_overlaps_a_save_reads_one_save(routers: tuple[PersonaRouter, PersonaRouter], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A load read router.json, then the weights: a save landing between the two paired one save's calibration
    with the other's weights. The weights' sha256 in router.json exposes the mix, and the load reads again."""
    first, second = routers
    folder = first.save(tmp_path / "stubpack")
    real_load = persona_router.load_classifier
    calls = []

    def load_after_a_save(*args: object, **kwargs: object) -> object:
        if not calls:
            second.save(folder)  # another process replaces the router between the two reads
        calls.append(1)
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(persona_router, "load_classifier", load_after_a_save)
    loaded = PersonaRouter.load(folder, pack=make_pack(), encoder=StubEncoder())
    assert len(calls) == 2 and loaded.calibration == second.calibration
    np.testing.assert_array_equal(loaded.probabilities(QUESTIONS), second.probabilities(QUESTIONS))


def test_weights_from_another_save_are_refused(routers: tuple[PersonaRouter, PersonaRouter], tmp_path: Path) -> None:
    first, second = routers
    folder, other = first.save(tmp_path / "one"), second.save(tmp_path / "two")
    (folder / "classifier.safetensors").write_bytes((other / "classifier.safetensors").read_bytes())
    with pytest.raises(RouterModelError, match="not the ones"):
        PersonaRouter.load(folder, pack=make_pack(), encoder=StubEncoder())
