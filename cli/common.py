"""``personas``, ``generate`` and ``prepare``: the pack, one answer from the base model, the offline set-up."""

from __future__ import annotations

import argparse
import json
from typing import Any

from persona_router.adapters.offline_default import DEFAULT_BASE


def add_base_arguments(parser: argparse.ArgumentParser, *, precision: bool = True) -> None:
    """``--base``, and unless ``precision=False`` (a command that does not load the weights itself) ``--device``
    and ``--quantization``."""
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help=f"base model: {DEFAULT_BASE!r} (offline default), a local folder, or a hub id such "
                        "as microsoft/Phi-3-mini-4k-instruct (default: %(default)s)")
    if not precision:
        return
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run (default: %(default)s: cuda if available)")
    parser.add_argument("--quantization", default="auto", choices=("auto", "nf4", "bf16", "fp16", "fp32"),
                        help="weights precision (default: %(default)s: nf4 on CUDA; on CPU fp32, but bf16 for serve "
                        "on a CPU with AMX-BF16 or AVX512-BF16)")


def add_pack_argument(parser: argparse.ArgumentParser, *, default: str | None = "demo",
                      extra: str = "default: demo") -> None:
    """``--pack``; a command whose default depends on other options passes ``default=None`` and says how."""
    parser.add_argument("--pack", default=default,
                        help="persona pack: 'demo', 'user' ($PERSONA_ROUTER_HOME/packs/user.toml, made by "
                        f"'persona add') or a TOML/YAML file ({extra})")


def register(subparsers: Any) -> None:
    personas = subparsers.add_parser("personas", help="list the personas of a pack")
    add_pack_argument(personas)
    personas.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    personas.set_defaults(handler=cmd_personas)

    generate = subparsers.add_parser(
        "generate", help="answer one question with the base model and a persona's system prompt",
        description="Answer one question with the base model and the persona's system prompt (no adapter).")
    generate.add_argument("question", help="the question to answer")
    generate.add_argument("--persona", required=True, help="persona name from the pack")
    generate.add_argument("--context", default=None, help="optional context passage")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="default: %(default)s")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    generate.add_argument("--top-p", type=float, default=1.0, help="default: %(default)s")
    generate.add_argument("--seed", type=int, default=None, help="sampling seed")
    add_pack_argument(generate)
    add_base_arguments(generate)
    generate.set_defaults(handler=cmd_generate)

    prepare = subparsers.add_parser(
        "prepare", help="build the offline default base model cache and fit the pack's router if missing",
        description="Build the offline default base model cache (once) and fit the pack's persona router if it "
        "is missing, or stale and fitted with the default settings (a stale router fitted with fit-router options "
        "is reported with the command that refits it, not replaced). Prints the two folders.")
    prepare.add_argument("--rebuild", action="store_true",
                         help="rebuild the cache and refit the router with the default settings (replacing one "
                         "fitted with fit-router options in the default folder)")
    add_pack_argument(prepare)
    prepare.set_defaults(handler=cmd_prepare)


def cmd_personas(args: argparse.Namespace) -> int:
    from persona_router.core.pack import load_pack

    pack = load_pack(args.pack)
    if args.json:
        json.dump([p.to_json() for p in pack.personas], args.result_stream, indent=2)
        args.result_stream.write("\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"persona pack {pack.name!r} ({pack.source})")
    for column in ("name", "fallback", "description"):
        table.add_column(column)
    for persona in pack.personas:
        table.add_row(persona.name, "yes" if persona.fallback else "", persona.description)
    Console().print(table)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from persona_router.adapters.base_model import BaseModelConfig, configure_threads, load_base
    from persona_router.adapters.generation import SamplingConfig, generate_one
    from persona_router.adapters.prompts import build_messages
    from persona_router.core.pack import load_pack

    pack = load_pack(args.pack)
    persona = pack.get(args.persona)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed)
    configure_threads()
    base = load_base(BaseModelConfig(base=args.base, device=args.device, quantization=args.quantization))
    messages = build_messages(args.question, system_prompt=persona.system_prompt, context=args.context)
    completion = generate_one(base.model, base.tokenizer, messages, sampling)
    print(completion.text)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from persona_router.adapters.offline_default import ensure_offline_default
    from persona_router.core.pack import load_pack
    from persona_router.router.fitting import ensure_router
    from persona_router.router.persona_router import default_router_dir

    print(ensure_offline_default(rebuild=args.rebuild))
    pack = load_pack(args.pack)
    ensure_router(pack, refit=args.rebuild)
    print(default_router_dir(pack.name))
    return 0
