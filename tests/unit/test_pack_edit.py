"""Pack editing (``persona add/remove``): the demo pack is copied, never modified; entries obey the loader's
rules; writes are atomic (a failed edit leaves the file as it was); the CLI says what comes next."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import pytest
from persona_router.cli.main import main
from persona_router.core.errors import PackError
from persona_router.core.pack import demo_pack_path, load_pack, user_pack_path
from persona_router.core.pack_edit import add_persona, dumps_toml, read_examples, remove_persona

PATIENT = {"name": "patient", "description": "Patients who want plain words.",
           "system_prompt": "You answer a patient in plain words.", "examples": ["does this pill work?"]}


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PERSONA_ROUTER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_add_creates_user_pack_from_demo_and_keeps_demo_untouched() -> None:
    before = digest(demo_pack_path())
    edit = add_persona(dict(PATIENT))
    assert edit.created_from_demo and edit.path == user_pack_path()
    assert digest(demo_pack_path()) == before
    demo, user = load_pack("demo"), load_pack("user")
    assert user.names == (*demo.names, "patient") and user.name == "user"
    assert user.get("patient").examples == ("does this pill work?",)
    for name in demo.names:  # the demo personas survive the rewrite field for field
        assert user.get(name) == demo.get(name)
    assert tomllib.loads(user_pack_path().read_text())["version"] == 1  # keys the loader ignores survive
    # A second edit edits the user pack in place (no second copy from the demo pack).
    again = add_persona({**PATIENT, "name": "carer"}, pack="demo")
    assert not again.created_from_demo and load_pack("user").names[-2:] == ("patient", "carer")


@pytest.mark.parametrize(("entry", "field"), [
    ({**PATIENT, "name": "Patient!"}, "name"),
    ({**PATIENT, "name": "a" * 41}, "name"),
    ({**PATIENT, "description": "  "}, "description"),
    ({**PATIENT, "examples": []}, "examples"),
    ({**PATIENT, "examples": ["ok", " "]}, "examples"),
    ({**PATIENT, "colour": "red"}, "personas[6]"),
    ({**PATIENT, "name": "student"}, "name"),
    ({**PATIENT, "fallback": True}, "fallback"),
])
def test_invalid_entries_are_refused_and_nothing_is_written(entry: dict, field: str) -> None:
    add_persona({**PATIENT, "name": "first"})
    before = digest(user_pack_path())
    with pytest.raises(PackError) as caught:
        add_persona(entry)
    assert field in str(caught.value)
    assert digest(user_pack_path()) == before
    assert not [p for p in user_pack_path().parent.iterdir() if p.name.startswith(".tmp-")]


def test_replace_and_remove_round_trip(tmp_path: Path) -> None:
    add_persona(dict(PATIENT))
    add_persona({**PATIENT, "system_prompt": "New prompt."}, replace=True)
    assert load_pack("user").get("patient").system_prompt == "New prompt."
    edit = remove_persona("patient")
    assert "patient" not in edit.pack and load_pack("user").names == load_pack("demo").names
    with pytest.raises(PackError, match="no persona 'patient'"):
        remove_persona("patient")
    with pytest.raises(PackError, match="fallback"):
        remove_persona("general-reader")
    with pytest.raises(PackError, match="no such pack file"):
        add_persona(dict(PATIENT), pack=tmp_path / "missing.toml")


def test_yaml_pack_is_edited_as_yaml(tmp_path: Path) -> None:
    pack = tmp_path / "mine.yaml"
    pack.write_text("name: mine\npersonas:\n  - name: a\n    description: d\n    system_prompt: s\n"
                    "    examples: [q]\n    fallback: true\n")
    add_persona(dict(PATIENT), pack=pack)
    assert load_pack(pack).names == ("a", "patient")


def test_toml_writer_escapes_what_toml_needs() -> None:
    raw = {"name": "x", "personas": [{**PATIENT, "system_prompt": 'quote " back \\ tab \t newline \n é del \x7f',
                                      "fallback": True}], "café": "a non-ASCII key"}
    assert tomllib.loads(dumps_toml(raw)) == raw


def test_replace_keeps_aliases_and_the_fallback_role_and_the_file_mode() -> None:
    """``--replace`` restates a persona's text: its aliases and fallback role stay unless given, the fallback
    persona itself can be edited, and the rewritten file keeps a mode other users can read."""
    add_persona({**PATIENT, "aliases": ["patients"]})
    user = user_pack_path()
    user.chmod(0o644)
    add_persona({**PATIENT, "system_prompt": "Plainer."}, replace=True)
    assert load_pack("user").get("patient").aliases == ("patients",)
    reader = load_pack("demo").get("general-reader")
    add_persona({"name": "general-reader", "description": reader.description, "system_prompt": "Plain and kind.",
                 "examples": list(reader.examples)}, replace=True)
    edited = load_pack("user")
    assert edited.get("general-reader").system_prompt == "Plain and kind." and edited.fallback.name == "general-reader"
    assert user.stat().st_mode & 0o777 == 0o644
    with pytest.raises(PackError, match="cannot be the fallback"):
        add_persona({**PATIENT, "name": "carer", "fallback": True})


def test_read_examples_text_and_jsonl(tmp_path: Path) -> None:
    text = tmp_path / "ex.txt"
    text.write_text("# comment\nfirst question\n\n  second one  \n")
    assert read_examples(text) == ["first question", "second one"]
    rows = tmp_path / "ex.jsonl"
    rows.write_text('{"question": "a?"}\n{"question": "b?", "persona": "x"}\n')
    assert read_examples(rows) == ["a?", "b?"]
    rows.write_text('{"text": "a?"}\n')
    with pytest.raises(PackError, match="row 1"):
        read_examples(rows)


def test_cli_add_and_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    examples = tmp_path / "ex.txt"
    examples.write_text("is this treatment safe for me?\n")
    code = main(["persona", "add", "patient", "--description", "Patients.", "--system-prompt", "Plain words.",
                 "--examples", str(examples), "--example", "what did the study find?"])
    out = capsys.readouterr().out
    assert code == 0 and "created the user pack" in out and "fit-router" in out and "train" in out
    assert "may not" in out and "inferred" in out  # two examples: no promise that the router infers it
    assert load_pack("user").get("patient").examples == ("what did the study find?", "is this treatment safe for me?")
    assert main(["persona", "add", "patient", "--description", "d", "--system-prompt", "s", "--example", "q"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["persona", "remove", "patient"]) == 0
    assert "removed persona 'patient'" in capsys.readouterr().out
    assert main(["persona", "add", "bad_name", "--description", "d", "--system-prompt", "s", "--example", "q"]) == 2


def test_concurrent_adds_keep_both_personas(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ``persona add`` at once: each read the pack before the other wrote it, and the second write lost the
    first persona. The read-modify-write now holds the pack's lock, so the second reads what the first wrote."""
    import threading

    from persona_router.core import pack_edit

    add_persona({**PATIENT, "name": "first-one"})  # the user pack exists from here
    real_read = pack_edit._read_raw
    first_read, second_read = threading.Event(), threading.Event()

    def read_slowly(path: Path) -> dict:  # type: ignore[type-arg]
        raw = real_read(path)
        if not first_read.is_set():
            first_read.set()
            second_read.wait(timeout=1.0)  # without the lock the other edit reads the same old pack meanwhile
        else:
            second_read.set()
        return raw

    monkeypatch.setattr(pack_edit, "_read_raw", read_slowly)
    errors: list[BaseException] = []

    def add(name: str) -> None:
        try:
            add_persona({**PATIENT, "name": name})
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(name,)) for name in ("nurse", "carer")]
    threads[0].start()
    first_read.wait(timeout=5)
    threads[1].start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert {"first-one", "nurse", "carer"} <= set(load_pack("user").names)


def test_replace_that_finds_nothing_says_added(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["persona", "add", "patient", "--description", "d", "--system-prompt", "s", "--example", "q", "--replace"]
    assert main(args) == 0
    assert "added persona 'patient'" in capsys.readouterr().out
    assert main(args) == 0
    assert "replaced persona 'patient'" in capsys.readouterr().out


def test_after_an_edit_a_router_of_the_users_own_gets_its_own_refit_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A router fitted with --data is not refitted by a server: the hint must say so and keep the --data."""
    import json

    from persona_router.router.persona_router import FORMAT_VERSION, ROUTER_FILE, default_router_dir

    data = tmp_path / "mine.jsonl"
    folder = default_router_dir("user")
    folder.mkdir(parents=True)
    (folder / ROUTER_FILE).write_text(json.dumps({
        "format_version": FORMAT_VERSION, "pack": {"name": "user", "source": "user"},
        "fit": {"default_settings": False, "data": [str(data)]}}), encoding="utf-8")
    args = ["persona", "add", "patient", "--description", "d", "--system-prompt", "s", "--example", "q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"--data {data}" in out and "does not refit it" in out and "also refits it by itself" not in out
    assert main(["persona", "remove", "patient"]) == 0
    assert f"--data {data}" in capsys.readouterr().out
    (folder / ROUTER_FILE).unlink()  # no router yet: the plain command, and the server fits it
    assert main(args) == 0
    assert "also refits it by itself" in capsys.readouterr().out
