"""Persona packs: personas as data, one TOML (or YAML) file per pack.

A pack names its personas, each with a description, a system prompt and example utterances; exactly one
persona is the fallback the router uses when it is not confident.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from persona_router.core.errors import PackError, UnknownPersonaError
from persona_router.core.home import home_dir
from persona_router.core.names import AUTO, PERSONA_NAME

DEMO_PACK = "demo"
_PACK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
USER_PACK = "user"  # the user's own pack, created from the demo pack by `persona add`
_PERSONA_FIELDS = ("name", "description", "system_prompt", "examples")
_OPTIONAL_FIELDS = ("fallback", "aliases")


@dataclass(frozen=True)
class Persona:
    name: str
    description: str
    system_prompt: str
    examples: tuple[str, ...]
    fallback: bool = False
    aliases: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "system_prompt": self.system_prompt,
            "examples": list(self.examples),
            "fallback": self.fallback,
            "aliases": list(self.aliases),
        }


@dataclass(frozen=True)
class PersonaPack:
    name: str
    personas: tuple[Persona, ...]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        fallbacks = [p.name for p in self.personas if p.fallback]
        if len(fallbacks) != 1:
            found = "none" if not fallbacks else ", ".join(fallbacks)
            raise PackError(f"exactly one persona must have fallback = true (found: {found})",
                            path=self.source, field="fallback")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.personas)

    @property
    def fallback(self) -> Persona:
        return next(p for p in self.personas if p.fallback)

    def get(self, name: str) -> Persona:
        for persona in self.personas:
            if persona.name == name:
                return persona
        raise UnknownPersonaError(name, self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names


def demo_pack_path() -> Path:
    return Path(str(resources.files("persona_router.core") / "packs" / f"{DEMO_PACK}.toml"))


def user_pack_path() -> Path:
    """``$PERSONA_ROUTER_HOME/packs/user.toml``: where ``persona add`` keeps the user's pack."""
    return home_dir() / "packs" / f"{USER_PACK}.toml"


def resolve_pack_path(path: str | Path | None) -> Path:
    """The file behind a pack reference: ``None``/``"demo"`` the bundled pack, ``"user"`` the user pack."""
    if path is None or str(path) == DEMO_PACK:
        return demo_pack_path()
    if str(path) == USER_PACK:
        return user_pack_path()
    return Path(path).expanduser()


def load_pack(path: str | Path | None = None) -> PersonaPack:
    """Load and validate a pack; ``None`` or ``"demo"`` gives the bundled demo pack, ``"user"`` the user pack."""
    reference = path
    path = resolve_pack_path(path)
    if not path.is_file():
        if str(reference) == USER_PACK:
            raise PackError("no user pack yet: `persona-router persona add` creates it from the demo pack", path=path)
        raise PackError("no such pack file", path=path)
    try:
        if path.suffix in (".yaml", ".yml"):
            raw = _load_yaml(path)
        else:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, ValueError, UnicodeDecodeError) as exc:
        raise PackError(f"cannot parse: {exc}", path=path) from exc
    return pack_from_dict(raw, source=str(path))


def pack_from_dict(raw: Any, *, source: str = "<memory>") -> PersonaPack:
    if not isinstance(raw, dict):
        raise PackError("the pack must be a table/mapping", path=source)
    entries = raw.get("personas")
    if not isinstance(entries, list) or not entries:
        raise PackError("needs a non-empty list of personas", path=source, field="personas")
    personas = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        persona = _persona_from_dict(entry, source=source, index=index)
        if persona.name in seen:
            raise PackError(f"duplicate persona name {persona.name!r}", path=source,
                            field=f"personas[{index}].name")
        seen.add(persona.name)
        personas.append(persona)
    name = raw.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise PackError("must be a non-empty string", path=source, field="name")
    if not _PACK_NAME.match(name):  # it names the pack's router folder: nothing that leaves it
        raise PackError(f"{name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
                        path=source, field="name")
    if name == DEMO_PACK and not _is_demo_file(source):
        raise PackError(f"{DEMO_PACK!r} is the built-in pack's name, and its router folder; give this pack its own "
                        "name", path=source, field="name")
    return PersonaPack(name=name, personas=tuple(personas), source=source)


def _is_demo_file(source: str) -> bool:
    try:
        return Path(source).resolve() == demo_pack_path().resolve()
    except OSError:
        return False


def _persona_from_dict(entry: Any, *, source: str, index: int) -> Persona:
    where = f"personas[{index}]"
    if not isinstance(entry, dict):
        raise PackError("each persona must be a table/mapping", path=source, field=where)
    for key in _PERSONA_FIELDS:
        if key not in entry:
            raise PackError("is missing", path=source, field=f"{where}.{key}")
    unknown = set(entry) - set(_PERSONA_FIELDS) - set(_OPTIONAL_FIELDS)
    if unknown:
        raise PackError(f"unknown keys {sorted(unknown)}; valid keys: {[*_PERSONA_FIELDS, *_OPTIONAL_FIELDS]}",
                        path=source, field=where)
    name = entry["name"]
    if not isinstance(name, str) or not PERSONA_NAME.match(name):
        raise PackError(f"{name!r} must be lowercase letters, digits and '-', starting with a letter (max 40)",
                        path=source, field=f"{where}.name")
    if name == AUTO:
        raise PackError(f"{AUTO!r} is reserved (the model id persona:{AUTO} infers the persona); choose another name",
                        path=source, field=f"{where}.name")
    for key in ("description", "system_prompt"):
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise PackError("must be a non-empty string", path=source, field=f"{where}.{key}")
    examples = entry["examples"]
    if not isinstance(examples, list) or not examples or not all(isinstance(e, str) and e.strip() for e in examples):
        raise PackError("must be a non-empty list of non-empty strings", path=source, field=f"{where}.examples")
    fallback = entry.get("fallback", False)
    if not isinstance(fallback, bool):
        raise PackError("must be true or false", path=source, field=f"{where}.fallback")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise PackError("must be a list of non-empty strings", path=source, field=f"{where}.aliases")
    if any(alias.strip().lower() == AUTO for alias in aliases):
        raise PackError(f"{AUTO!r} is reserved (the model id persona:{AUTO} infers the persona)", path=source,
                        field=f"{where}.aliases")
    return Persona(
        name=name,
        aliases=tuple(a.strip() for a in aliases),
        description=entry["description"].strip(),
        system_prompt=" ".join(entry["system_prompt"].split()),
        examples=tuple(e.strip() for e in examples),
        fallback=fallback,
    )


def _load_yaml(path: Path) -> Any:
    try:
        import yaml
    except ImportError as exc:
        raise PackError("YAML packs need PyYAML: pip install pyyaml (or use TOML)", path=path) from exc
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc
