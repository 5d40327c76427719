"""``persona-router eval``: ``ab`` compares two arms on one persona's items; ``matrix`` checks whether each
persona's adapter sounds like its persona (the judge's confusion matrix) next to the prompt baseline."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from persona_router.cli.common import add_base_arguments, add_pack_argument
from persona_router.eval.specs import VALID_FORMS


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate adapters: A/B comparisons and the persona matrix",
        description="Evaluate adapters against each other and against baselines, with a style judge that is "
        "independent of the adapters, paired statistics, and a report (report.json, report.md, PNG plots).")
    commands = parser.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND", required=True)

    ab = commands.add_parser(
        "ab", help="compare two arms on one persona's held-out questions",
        description="Both arms answer the same questions with the same decoding settings and seeds. "
        f"SPEC: {VALID_FORMS}.")
    ab.add_argument("--persona", required=True, help="persona whose items are evaluated")
    ab.add_argument("--a", required=True, metavar="SPEC", help="arm A")
    ab.add_argument("--b", required=True, metavar="SPEC", help="arm B")
    ab.add_argument("--engine", default="sequential", choices=("sequential", "batched"),
                    help="sequential: one generate call per answer; batched: every answer queued at once in the "
                    "batched engine, --max-batch rows per forward pass (same greedy tokens in float32; latency_s "
                    "then compares nothing) (default: %(default)s)")
    ab.add_argument("--max-batch", type=int, default=16, help="rows per forward pass with --engine batched "
                    "(default: %(default)s)")
    _common(ab)
    ab.set_defaults(handler=cmd_ab)

    matrix = commands.add_parser(
        "matrix", help="every persona's adapter answers the same questions; judge confusion vs the prompt baseline",
        description="Each persona's adapter (latest, or pinned with --use) and the 'prompt' baseline answer the "
        "same parallel questions; the style judge's confusion matrix shows whether adapters separate personas.")
    matrix.add_argument("--use", nargs="+", default=(), metavar="NAME@VERSION",
                        help="pin adapter versions (default: each persona's latest)")
    matrix.add_argument("--engine", default="sequential", choices=("sequential", "batched"),
                        help="sequential: one generate call per answer; batched: every answer queued at once in the "
                        "batched engine, --max-batch rows per forward pass (same greedy tokens in float32) "
                        "(default: %(default)s)")
    matrix.add_argument("--max-batch", type=int, default=16, help="rows per forward pass with --engine batched "
                        "(default: %(default)s)")
    matrix.add_argument("--items", choices=("parallel", "own", "all"), default="parallel",
                        help="parallel: the shared held-out questions, once per persona; own: each persona's own "
                        "held-out questions; all: both (default: %(default)s)")
    matrix.add_argument("--no-system-prompt", dest="system_prompt", action="store_false",
                        help="withhold the persona's system prompt from both arms (baseline: the bare base), to see "
                        "whether the adapters carry the style on their own")
    _common(matrix)
    matrix.set_defaults(handler=cmd_matrix)


def _common(parser: argparse.ArgumentParser) -> None:
    add_pack_argument(parser)
    add_base_arguments(parser)
    parser.add_argument("--adapters", default=None, metavar="DIR",
                        help="adapter registry root (default: $PERSONA_ROUTER_ADAPTERS or "
                        "$PERSONA_ROUTER_HOME/adapters)")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="evaluation QA file (default: the demo pack's held-out test split)")
    parser.add_argument("--train-data", default=None, metavar="FILE",
                        help="reference answers for the judge and readability ranges (default: demo train split)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="evaluate only the first N items (matrix: N questions)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling, bootstrap and style-judge (cross-validation folds) seed (default: %(default)s)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="report folder (default: $PERSONA_ROUTER_HOME/eval/reports/ab-<persona>-<YYYYmmdd-HHMMSS>"
                        " for ab, matrix-<YYYYmmdd-HHMMSS> for matrix)")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="default: %(default)s")
    parser.add_argument("--max-context-chars", type=int, default=2000,
                        help="cut contexts to this many characters, as the original notebook did "
                        "(default: %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=5000,
                        help="bootstrap resamples, at least 100 (default: %(default)s)")
    parser.add_argument("--cochrane-pairs", type=int, default=200,
                        help="pairs for the judge's Cochrane check; 0 skips it (default: %(default)s)")


# The settings' own field names, as the command line spells them (an error must name the option to change).
_OPTIONS = {"n_boot": "--bootstrap", "max_batch": "--max-batch", "cochrane_pairs": "--cochrane-pairs",
            "max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
            "limit": "--limit", "max_context_chars": "--max-context-chars", "engine": "--engine"}


def _config(args: argparse.Namespace) -> Any:
    from persona_router.core.errors import ConfigError

    try:
        return _build_config(args)
    except ConfigError as exc:
        raise ConfigError(exc.detail, path=exc.path, field=_OPTIONS.get(exc.field or "", exc.field)) from exc


def _build_config(args: argparse.Namespace) -> Any:
    from persona_router.adapters.base_model import BaseModelConfig
    from persona_router.adapters.generation import SamplingConfig
    from persona_router.eval.pipeline import EvalConfig
    from persona_router.eval.stats import StatsConfig

    return EvalConfig(
        base=BaseModelConfig(base=args.base, device=args.device, quantization=args.quantization),
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p),
        adapters_root=Path(args.adapters).expanduser() if args.adapters else None, data=args.data,
        train_data=args.train_data, limit=args.limit, seed=args.seed, max_context_chars=args.max_context_chars,
        cochrane_pairs=args.cochrane_pairs, stats=StatsConfig(n_boot=args.bootstrap, seed=args.seed),
        engine=getattr(args, "engine", "sequential"), max_batch=getattr(args, "max_batch", 16))


@contextlib.contextmanager
def progress_bar(total: int, description: str) -> Iterator[Callable[[int], None]]:
    from tqdm import tqdm

    with tqdm(total=total, desc=description, unit="answer", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar.update


def _out_dir(args: argparse.Namespace, name: str) -> Path:
    """The report folder, checked before any model loads: a run's answers must not be lost at the end to a
    folder that cannot be written."""
    if args.out:
        out = Path(args.out).expanduser()
    else:
        from persona_router.core.home import home_dir

        out = home_dir() / "eval" / "reports" / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    _check_writable(out, field="--out" if args.out else "PERSONA_ROUTER_HOME")
    return out


def _check_writable(out: Path, *, field: str) -> None:
    from persona_router.core.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder for the report", field=field)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the report under {existing}", field=field)


def cmd_ab(args: argparse.Namespace) -> int:
    from persona_router.adapters.base_model import configure_threads
    from persona_router.core.pack import load_pack
    from persona_router.eval.pipeline import run_ab
    from persona_router.eval.report import tested_metrics, write_report
    from persona_router.eval.specs import parse_spec

    parse_spec(args.a, field="a")  # fail on a bad SPEC before loading any model
    parse_spec(args.b, field="b")
    pack = load_pack(args.pack)
    pack.get(args.persona)
    config = _config(args)
    out = _out_dir(args, f"ab-{args.persona}")
    configure_threads()
    report = run_ab(pack, args.persona, args.a, args.b, config, progress_bar)
    write_report(report, out)
    for comparison in report["comparisons"]:
        print(comparison["verdict"])
    # The family is the metrics a test ran on, not every metric listed: latency_s in a batched run and a metric
    # without paired values have no p-value to correct.
    print(f"(p-values per metric, not corrected for the {len(tested_metrics(report['comparisons']))} metrics tested)")
    print(f"report: {out}")
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    from persona_router.adapters.base_model import configure_threads
    from persona_router.core.pack import load_pack
    from persona_router.eval.pipeline import run_matrix
    from persona_router.eval.report import write_report

    pack = load_pack(args.pack)
    config = _config(args)
    out = _out_dir(args, "matrix")
    configure_threads()
    report = run_matrix(pack, config, progress_bar, pins=args.use, items_kind=args.items,
                        system_prompt=args.system_prompt)
    write_report(report, out)
    for name, condition in report["conditions"].items():
        print(f"{name}: judge accuracy {condition['accuracy']:.3f} over {condition['n']} answers")
    for persona, reason in report["missing_adapters"].items():
        print(f"no adapter for {persona}: {reason}")
    print(f"report: {out}")
    return 0
