"""``persona add`` and ``persona remove``: edit a persona pack, then say what comes next."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from persona_router.core.errors import PackError

# The README's worked example: with this many examples its new persona is inferred (6 were not enough).
FEW_EXAMPLES = 16


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "persona", help="add or remove a persona of a pack (the demo pack is copied to the user pack first)",
        description="Edit a persona pack. Without --pack (or with --pack demo/user) the user pack "
        "$PERSONA_ROUTER_HOME/packs/user.toml is edited; it is created as a copy of the demo pack the first time, "
        "and the bundled demo pack is never modified. Entries are validated by the pack loader's rules and the "
        "file is replaced atomically. A running `serve --pack user` picks the change up by itself.")
    commands = parser.add_subparsers(dest="persona_command", metavar="PERSONA_COMMAND", required=True)

    add = commands.add_parser("add", help="add a persona to a pack",
                              description="Add a persona: name, description, system prompt, routing examples.")
    add.add_argument("name", help="persona name: lowercase letters, digits and '-', starting with a letter (max 40)")
    add.add_argument("--description", required=True, help="who asks as this persona (also shown in /v1/personas)")
    add.add_argument("--system-prompt", required=True, help="the system prompt answers are generated with")
    add.add_argument("--example", action="append", default=[], metavar="TEXT",
                     help="a routing example: a question this persona would ask (repeatable)")
    add.add_argument("--examples", default=None, metavar="FILE",
                     help="routing examples: a text file (one per line, '#' comments) or JSONL/JSON rows with "
                     "'question'")
    add.add_argument("--alias", action="append", default=[], metavar="LABEL",
                     help="a free-text audience label of training data that maps onto this persona (repeatable)")
    add.add_argument("--replace", action="store_true", help="overwrite a persona of the same name")
    _pack_argument(add)
    add.set_defaults(handler=cmd_add)

    remove = commands.add_parser("remove", help="remove a persona from a pack",
                                 description="Remove a persona (never the fallback). Its adapters stay on disk.")
    remove.add_argument("name", help="persona to remove")
    _pack_argument(remove)
    remove.set_defaults(handler=cmd_remove)


def _pack_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pack", default="user",
                        help="pack file to edit; 'user' (default) or 'demo' edit the user pack "
                        "$PERSONA_ROUTER_HOME/packs/user.toml, created from the demo pack when missing")


def cmd_add(args: argparse.Namespace) -> int:
    from persona_router.core.pack_edit import add_persona, read_examples

    examples = list(args.example)
    if args.examples:
        examples += read_examples(args.examples)
    if not examples:
        raise PackError("give at least one routing example (--example TEXT or --examples FILE)", field="examples")
    entry: dict[str, Any] = {"name": args.name, "description": args.description,
                             "system_prompt": args.system_prompt, "examples": examples}
    if args.alias:
        entry["aliases"] = list(args.alias)
    edit = add_persona(entry, pack=args.pack, replace=args.replace)
    _say_created(edit)
    verb = "replaced" if edit.replaced else "added"  # --replace allows a replacement; it may find none
    print(f"{verb} persona {args.name!r} ({len(examples)} routing examples) in {edit.path}")
    pack = shlex.quote(str(edit.path))
    print("next:")
    _say_refit(edit.path, "refit the router")
    if len(examples) < FEW_EXAMPLES:
        print(f"  note: '{args.name}' is inferred only once cross-validation on its examples reaches the target "
              f"precision, which {len(examples)} examples may not: fit-router's report says whether it is (the "
              f"README's example, which is inferred, has {FEW_EXAMPLES})")
    print(f"  persona-router train --pack {pack} --persona {args.name} --data ROWS.jsonl   # its adapter "
          "(rows: persona, question, answer, context?)")
    print(f"  persona-router serve --pack {pack}             # or, if it already runs on this pack: it reloads the "
          "pack and new adapters by itself (or POST /v1/admin/reload)")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from persona_router.core.pack_edit import remove_persona

    edit = remove_persona(args.name, pack=args.pack)
    _say_created(edit)
    print(f"removed persona {args.name!r} from {edit.path}; its adapters stay in the adapters folder")
    print("next:")
    _say_refit(edit.path, f"refit the router without '{args.name}'")
    print("  a server running on this pack drops it at its next reload: requests naming it get 404, "
          "requests already running finish")
    return 0


def _say_refit(pack_path: Path, why: str) -> None:
    """The refit command: with the defaults a running server refits by itself; a router the user fitted with
    their own data or settings is refitted only by hand, with those (a server keeps the old pack until then)."""
    from persona_router.core.pack import load_pack
    from persona_router.router.fitting import refit_advice

    command, server_refits = refit_advice(load_pack(pack_path), str(pack_path))
    if server_refits:
        print(f"  {command}        # {why} (a running server also refits it by itself)")
    else:
        print(f"  {command}        # {why}: it was fitted with your own data or settings, so a running server "
              "does not refit it and keeps serving the pack as it was until this has run")


def _say_created(edit: Any) -> None:
    if edit.created_from_demo:
        print(f"created the user pack {edit.path} from the demo pack (the demo pack itself is not modified)")

