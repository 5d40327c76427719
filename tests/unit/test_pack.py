from __future__ import annotations

from pathlib import Path

import pytest
from persona_router.core.errors import PackError, UnknownPersonaError
from persona_router.core.pack import load_pack, pack_from_dict

DEMO = ("student", "clinician", "educator", "engineer", "general-reader")


def persona(name: str, **extra: object) -> dict[str, object]:
    return {"name": name, "description": f"{name} desc", "system_prompt": "Be helpful.", "examples": ["hi?"], **extra}


def test_demo_pack_has_the_five_personas_and_one_fallback() -> None:
    pack = load_pack()
    assert pack.names == DEMO
    assert pack.fallback.name == "general-reader"
    assert all(p.examples and p.system_prompt for p in pack.personas)


def test_unknown_persona_lists_valid_names() -> None:
    with pytest.raises(UnknownPersonaError) as info:
        load_pack().get("pirate")
    assert "clinician" in str(info.value) and "pirate" in str(info.value)


@pytest.mark.parametrize(
    ("personas", "field", "message"),
    [
        ([persona("x", fallback=True), persona("x")], "personas[1].name", "duplicate"),
        ([persona("x"), persona("y")], "fallback", "found: none"),
        ([persona("x", fallback=True), persona("y", fallback=True)], "fallback", "found: x, y"),
        ([{"name": "x", "description": "d", "examples": ["q"], "fallback": True}], "personas[0].system_prompt",
         "missing"),
        ([persona("Bad Name", fallback=True)], "personas[0].name", "lowercase"),
        ([persona("x", fallback=True, colour="red")], "personas[0]", "unknown keys"),
        ([persona("x", fallback="yes")], "personas[0].fallback", "true or false"),
        ([persona("x", fallback=True), persona("auto")], "personas[1].name", "reserved"),
        ([persona("x", fallback=True, aliases=["Auto"])], "personas[0].aliases", "reserved"),
    ],
)
def test_invalid_packs_name_file_and_field(personas: list[dict[str, object]], field: str, message: str) -> None:
    with pytest.raises(PackError) as info:
        pack_from_dict({"name": "t", "personas": personas}, source="packs/t.toml")
    text = str(info.value)
    assert "packs/t.toml" in text and repr(field) in text and message in text


def test_toml_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n[[personas]\n", encoding="utf-8")
    with pytest.raises(PackError, match=r"bad\.toml: cannot parse"):
        load_pack(bad)
    with pytest.raises(PackError, match="no such pack file"):
        load_pack(tmp_path / "missing.toml")


def test_yaml_pack_loads(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: y\npersonas:\n  - name: a1\n    description: d\n    system_prompt: s\n    examples: [q]\n"
        "    fallback: true\n",
        encoding="utf-8",
    )
    assert load_pack(path).fallback.name == "a1"
