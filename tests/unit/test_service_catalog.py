"""The service's catalog (pack + router) reload: one immutable object swapped in one place, rebuilt only when its
files change, a broken pack never replaces a working one, and the residency learns the personas first."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from persona_router.core.errors import UnknownPersonaError
from persona_router.core.pack import demo_pack_path
from persona_router.core.pack_edit import add_persona, remove_persona
from persona_router.service.catalog import CatalogBuilder, CatalogHolder, CatalogReloader

NEW = {"name": "patient", "description": "Patients.", "system_prompt": "Plain words.", "examples": ["does it work?"]}


class FakeResidency:
    def __init__(self, holder: list[CatalogHolder]) -> None:
        self.calls: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
        self.holder = holder

    async def set_personas(self, personas: Any) -> dict[str, Any]:
        # Record what serves at the moment the residency is told: the swap must come after.
        self.calls.append((tuple(personas), self.holder[0].current.pack.names))
        return {}


class CountingBuilder(CatalogBuilder):
    builds = 0

    def build(self, generation: int = 1) -> Any:
        self.builds += 1
        return super().build(generation)


@pytest.fixture
def pack_file(tmp_path: Path) -> Path:
    path = tmp_path / "team.toml"
    path.write_text(demo_pack_path().read_text(encoding="utf-8").replace('name = "demo"', 'name = "team"', 1))
    return path


def make(pack_file: Path) -> tuple[CatalogHolder, CatalogReloader, FakeResidency, CountingBuilder]:
    builder = CountingBuilder(str(pack_file), "fallback")
    holder = CatalogHolder(builder.build())
    residency = FakeResidency([holder])
    return holder, CatalogReloader(holder, builder, residency), residency, builder  # type: ignore[arg-type]


def test_add_and_remove_swap_a_new_catalog(pack_file: Path) -> None:
    holder, reloader, residency, builder = make(pack_file)
    first = holder.current
    assert asyncio.run(reloader.reload())["changed"] is False and builder.builds == 1  # nothing changed on disk
    forced = asyncio.run(reloader.reload(force=True))  # the admin reload rebuilds the same files
    assert forced["reloaded"] and forced["changed"] is False and builder.builds == 2
    first = holder.current
    add_persona(dict(NEW), pack=pack_file)
    result = asyncio.run(reloader.reload())
    assert result["changed"] and result["added"] == ["patient"] and result["generation"] == 3
    assert holder.current is not first and "patient" in holder.current.pack
    assert holder.current.decide("q", "patient").persona == "patient"
    # The snapshot a request took before the swap is untouched: old pack, old routing.
    assert "patient" not in first.pack
    with pytest.raises(UnknownPersonaError):
        first.decide("q", "patient")
    # The residency heard of the new persona while the old catalog was still serving.
    assert residency.calls[-1] == (holder.current.pack.names, first.pack.names)
    with_patient = holder.current
    remove_persona("patient", pack=pack_file)
    result = asyncio.run(reloader.reload())
    assert result["removed"] == ["patient"] and "patient" not in holder.current.pack
    # The residency keeps the removed persona while the old catalog can still route to it, then drops it.
    assert residency.calls[-2] == ((*holder.current.pack.names, "patient"), with_patient.pack.names)
    assert residency.calls[-1] == (holder.current.pack.names, holder.current.pack.names)


def test_broken_pack_keeps_serving_and_is_not_rebuilt_every_tick(pack_file: Path) -> None:
    holder, reloader, _, builder = make(pack_file)
    good, serving = pack_file.read_text(), holder.current
    pack_file.write_text(good.replace('name = "student"', 'name = "Student!"', 1))
    result = asyncio.run(reloader.reload())
    assert result["changed"] is False and "Student!" in result["error"] and holder.current is serving
    builds = builder.builds
    asyncio.run(reloader.reload())  # the watcher's next tick: same broken files, no rebuild
    assert builder.builds == builds and reloader.last_error is not None
    assert asyncio.run(reloader.reload(force=True))["error"]  # the admin reload retries and reports again
    pack_file.write_text(good + "\n")
    assert asyncio.run(reloader.reload())["changed"] and reloader.last_error is None
    assert holder.current.generation == serving.generation + 1


def test_swap_is_the_one_place_that_changes_the_catalog(pack_file: Path) -> None:
    holder, *_ = make(pack_file)
    old = holder.current
    with pytest.raises(AttributeError):
        holder.current = old  # type: ignore[misc]
    with pytest.raises(AttributeError):
        old.pack = old.pack  # type: ignore[misc]  # frozen
    assert holder.swap(old) is old


def test_an_edit_landing_during_a_build_is_not_missed(pack_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the pack file changes right after a build read it. The built catalog must not
    carry the edited file's stamp, or the reloader would never rebuild for that edit."""
    import persona_router.service.catalog as catalog

    real_load = catalog.load_pack
    edited: list[bool] = []

    def load_then_edit(ref: str) -> Any:
        pack = real_load(ref)
        if not edited:
            edited.append(True)
            add_persona(dict(NEW), pack=pack_file)
        return pack

    monkeypatch.setattr(catalog, "load_pack", load_then_edit)
    holder, reloader, _, builder = make(pack_file)
    assert "patient" not in holder.current.pack  # the build read the file before the edit
    result = asyncio.run(reloader.reload())
    assert result["changed"] and result["added"] == ["patient"] and builder.builds == 2
    assert "patient" in holder.current.pack
