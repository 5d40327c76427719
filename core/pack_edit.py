"""Edit persona packs: add or remove one persona, validated by the loader's rules, written atomically.

The bundled demo pack is never modified in place: editing it (or the ``user`` pack before it exists)
creates the user pack ``$PERSONA_ROUTER_HOME/packs/user.toml`` as a copy of the demo pack and edits
that. Edits work on the raw parsed file, so keys the loader ignores (``version``) survive; the new
file is validated with ``pack_from_dict`` before it replaces the old one, so a bad entry never
reaches disk.
"""

from __future__ import annotations

import contextlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_router.core.atomic import atomic_write_text
from persona_router.core.errors import PackError
from persona_router.core.file_lock import file_lock
from persona_router.core.pack import DEMO_PACK, USER_PACK, PersonaPack, demo_pack_path, pack_from_dict, user_pack_path


@dataclass(frozen=True)
class PackEdit:
    """What an edit did: the file written, whether it was created from the demo pack, the new pack, and whether
    an existing persona was replaced (``add_persona(replace=True)`` that found one)."""

    path: Path
    created_from_demo: bool
    pack: PersonaPack
    replaced: bool = False


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+\Z")  # TOML bare keys: ASCII only


def writable_pack_path(pack: str | Path | None) -> tuple[Path, bool]:
    """The file an edit writes, and whether it must first be created from the demo pack.

    ``None``, ``"user"``, ``"demo"`` or the demo pack's own file all mean the user pack.
    """
    if pack is None or str(pack) in (USER_PACK, DEMO_PACK):
        target = user_pack_path()
        return target, not target.is_file()
    path = Path(pack).expanduser()
    if path.resolve() == demo_pack_path().resolve():
        target = user_pack_path()
        return target, not target.is_file()
    if not path.is_file():
        raise PackError("no such pack file (leave --pack out to create the user pack from the demo pack)", path=path)
    return path, False


def _read_for_edit(pack: str | Path | None) -> tuple[Path, bool, dict[str, Any], list[Any]]:
    """(file to write, whether it is created from the demo pack, its raw table, its persona entries); called
    under ``pack_lock``."""
    path, from_demo = writable_pack_path(pack)
    raw = _read_raw(demo_pack_path() if from_demo else path)
    if from_demo:
        raw["name"] = USER_PACK
    return path, from_demo, raw, list(raw.get("personas") or [])


def add_persona(entry: dict[str, Any], *, pack: str | Path | None = None, replace: bool = False) -> PackEdit:
    """Add ``entry`` (the fields of one ``[[personas]]`` table) to the pack; ``replace`` overwrites a
    persona of the same name, else that is an error."""
    with pack_lock(pack):
        path, from_demo, raw, entries = _read_for_edit(pack)
        name = entry.get("name")
        clash = [i for i, e in enumerate(entries) if isinstance(e, dict) and e.get("name") == name]
        if clash and not replace:
            raise PackError(f"persona {name!r} already exists (use --replace to overwrite it)", path=path,
                            field=f"personas[{clash[0]}].name")
        if clash:
            # A replacement keeps what it does not restate: the old aliases (rows labelled by them still map) and
            # the fallback role (a pack needs exactly one, and the fallback persona is edited this way too).
            old = entries[clash[0]] if isinstance(entries[clash[0]], dict) else {}
            entry = {**{key: old[key] for key in ("aliases", "fallback") if key in old}, **entry}
        if entry.get("fallback") and not (clash and entries[clash[0]].get("fallback")):
            raise PackError("a new persona cannot be the fallback (the pack already has one)", path=path,
                            field="fallback")
        if clash:
            entries[clash[0]] = entry
        else:
            entries.append(entry)
        raw["personas"] = entries
        return PackEdit(path=path, created_from_demo=from_demo, pack=_write(raw, path), replaced=bool(clash))


def remove_persona(name: str, *, pack: str | Path | None = None) -> PackEdit:
    """Remove persona ``name``; the fallback persona cannot be removed."""
    with pack_lock(pack):
        path, from_demo, raw, entries = _read_for_edit(pack)
        kept = [e for e in entries if not (isinstance(e, dict) and e.get("name") == name)]
        if len(kept) == len(entries):
            valid = sorted(str(e.get("name")) for e in entries if isinstance(e, dict))
            raise PackError(f"no persona {name!r} to remove; personas: {', '.join(valid)}", path=path, field="name")
        if any(isinstance(e, dict) and e.get("name") == name and e.get("fallback") for e in entries):
            raise PackError(f"{name!r} is the pack's fallback persona and cannot be removed", path=path, field="name")
        raw["personas"] = kept
        return PackEdit(path=path, created_from_demo=from_demo, pack=_write(raw, path))


def pack_lock(pack: str | Path | None) -> contextlib.AbstractContextManager[None]:
    """The lock every edit of one pack file holds from its read to its write (beside the file, which an edit
    replaces), so that two concurrent edits apply one after the other instead of one losing the other's."""
    path, _ = writable_pack_path(pack)
    return file_lock(path.parent / f".{path.name}.lock", waiting=f"waiting for another edit of {path}")


def read_examples(path: str | Path) -> list[str]:
    """Routing examples from a file: JSONL/JSON rows with ``question``, or plain text, one per line
    (blank lines and ``#`` comments skipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PackError("no such examples file", path=path, field="examples")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".jsonl", ".json"):
        rows: list[Any] = []
        if path.suffix == ".json":
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not isinstance(rows, list):
            raise PackError("must hold a list of rows", path=path, field="examples")
        out = []
        for index, row in enumerate(rows):
            question = row.get("question") if isinstance(row, dict) else row
            if not isinstance(question, str) or not question.strip():
                raise PackError(f"row {index + 1} needs a non-empty 'question' string", path=path, field="examples")
            out.append(question.strip())
        return out
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _read_raw(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = tomllib.loads(text)
    except ImportError as exc:
        raise PackError("YAML packs need PyYAML: pip install pyyaml (or use TOML)", path=path) from exc
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError and YAMLError are ValueErrors
        raise PackError(f"cannot parse: {exc}", path=path) from exc
    if not isinstance(raw, dict):
        raise PackError("the pack must be a table/mapping", path=path)
    return raw


def _write(raw: dict[str, Any], path: Path) -> PersonaPack:
    """Validate with the loader's rules, then replace the file atomically."""
    pack = pack_from_dict(raw, source=str(path))
    if path.suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=120)
        written = yaml.safe_load(text)
    else:
        text = dumps_toml(raw)
        written = tomllib.loads(text)
    if written != json.loads(json.dumps(raw)):  # the file must load back as exactly what was validated
        raise PackError("the edited pack does not survive being written as text; nothing was changed", path=path)
    atomic_write_text(path, text)
    return pack


def dumps_toml(raw: dict[str, Any]) -> str:
    """TOML for a pack: top-level scalars, then one ``[[personas]]`` table each (strings, bools, numbers
    and lists of strings). JSON string escapes are valid TOML basic-string escapes."""
    lines = ["# A persona pack written by `persona-router persona add/remove`; see the README's pack section.", ""]
    for key, value in raw.items():
        if key != "personas":
            lines.append(f"{_key(key)} = {_value(value, key)}")
    for entry in raw.get("personas") or []:
        lines += ["", "[[personas]]"]
        for key, value in entry.items():
            lines.append(f"{_key(key)} = {_value(value, key)}")
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _string(value: str) -> str:
    # JSON escapes are TOML escapes, but JSON leaves DEL (U+007F) raw, which TOML forbids in a string.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        if not value:
            return "[]"
        return "[\n" + "".join(f"  {_string(v)},\n" for v in value) + "]"
    raise PackError(f"cannot write a value of type {type(value).__name__} to a TOML pack", field=key)
