"""``fit-router`` and ``route``: fit the persona router and report on it; route questions with it."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from persona_router.cli.common import add_pack_argument
from persona_router.core.errors import DataError, InvalidRequestError

ROUTE_CHUNK = 256
ARGUMENT = "QUESTION argument "  # where a question from the command line came from, for errors


def register(subparsers: Any) -> None:
    fit = subparsers.add_parser(
        "fit-router", help="fit the persona router (embeddings + classifier + calibrated thresholds)",
        description="Fit the router on labelled utterances (JSONL/CSV/JSON/Parquet rows with persona and "
        "question), calibrate per-persona thresholds by cross-validation, save it and report on it.")
    add_pack_argument(fit)
    fit.add_argument("--data", action="append", default=None, metavar="FILE",
                     help="training utterances (repeatable), used instead of the default ones: the demo "
                     "utterances of every persona the pack shares with the demo pack; each persona's pack examples "
                     "are added either way")
    fit.add_argument("--test", default=None, metavar="FILE",
                     help="held-out utterances to score, never fitted on; default: the demo test split for the demo "
                     "pack; 'none' to skip")
    fit.add_argument("--out", default=None,
                     help="router folder, new, empty or holding a router (replaced); default: "
                     "$PERSONA_ROUTER_HOME/router/<pack>")
    fit.add_argument("--embedder", default=None,
                     help="sentence-transformers id or folder, a folder recorded by its absolute path (default: "
                     "offline all-MiniLM-L6-v2)")
    fit.add_argument("--encoder-backend", default="onnx-int8", choices=("torch", "onnx", "onnx-int8"),
                     help="what runs the embedder: torch (sentence-transformers), onnx (ONNX Runtime, float32) or "
                     "onnx-int8 (ONNX Runtime, int8 weights; exported once, cached, copied into the router folder); "
                     "default: %(default)s (measured, see README)")
    fit.add_argument("--target-precision", type=float, default=0.9,
                     help="precision each persona must reach before it is inferred (default: %(default)s)")
    fit.add_argument("--classifier", default="logreg", choices=("logreg", "centroid", "knn"),
                     help="default: %(default)s (chosen by measurement, see README)")
    fit.add_argument("--compare", action="store_true",
                     help="also fit every classifier kind and print cross-validation and held-out metrics side by side")
    fit.set_defaults(handler=cmd_fit_router)

    route = subparsers.add_parser(
        "route", help="decide the persona of questions",
        description="Print one decision per question, in input order. Questions come from the arguments or a "
        "JSONL file with one object per line holding 'question' (and optionally 'persona').")
    route.add_argument("questions", nargs="*", metavar="QUESTION", help="questions to route")
    route.add_argument("--input", default=None, metavar="FILE.jsonl", help="JSONL questions ('-' for stdin)")
    route.add_argument("--persona", default=None, help="name a persona for the QUESTION arguments (skips inference)")
    route.add_argument("--router", default=None,
                       help="fitted router folder (default: the pack's router in its default folder, fitted first "
                       "if missing, refitted if stale and fitted with the default settings)")
    add_pack_argument(route, default=None,
                      extra="default: with --router, the pack the router was fitted for; else demo")
    route.add_argument("--json", action="store_true", help="one JSON object per line")
    route.add_argument("--batch-size", type=int, default=64, help="questions per encoder batch (default: %(default)s)")
    route.set_defaults(handler=cmd_route)


def cmd_fit_router(args: argparse.Namespace) -> int:
    from persona_router.core.pack import load_pack
    from persona_router.router.comparison import compare_classifiers
    from persona_router.router.fitting import (
        FitConfig,
        default_training_records,
        evaluate,
        fit_router,
        load_routing_records,
    )
    from persona_router.router.onnx_encoder import build_encoder
    from persona_router.router.persona_router import check_replaceable, default_router_dir, pack_reference

    pack = load_pack(args.pack)
    out = Path(args.out) if args.out else default_router_dir(pack.name)
    check_replaceable(out, field="--out")  # before the fit: a folder that is not a router is never replaced
    config = FitConfig(classifier=args.classifier, target_precision=args.target_precision)
    train = load_routing_records(args.data, pack) if args.data else default_training_records(pack)
    test = _test_records(args.test, pack, is_demo=pack_reference(pack) == "demo")
    encoder = build_encoder(args.embedder, args.encoder_backend)
    result = fit_router(pack, train, encoder=encoder, config=config, default_settings=_default_settings(args, config),
                        data_files=args.data or [])
    reports = [r for r in (result.cv_report,) if r is not None]
    if test:
        reports.append(evaluate(result.router, test, title="held-out test"))
    comparison = compare_classifiers(pack, train, test, encoder=encoder, config=config) if args.compare else None
    markdown = _report_markdown(result.router, reports, comparison)

    def write_report(folder: Path) -> None:
        (folder / "report.md").write_text(markdown, encoding="utf-8")
        payload = {"reports": [r.to_json() for r in reports], "comparison": comparison,
                   "fit_seconds": round(result.seconds, 2), "selection": result.selection}
        (folder / "report.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        if reports:
            reports[-1].save_confusion_png(folder / "confusion.png")

    result.router.save(out, extra=write_report)
    print(markdown)
    print(f"router saved to {out} (report.md, report.json, confusion.png beside it)")
    return 0


def _default_settings(args: argparse.Namespace, config: Any) -> bool:
    """Whether this fit is the one ``ensure_router`` would make: only then may it refit the router by itself."""
    from persona_router.router.encoder import DEFAULT_EMBEDDER
    from persona_router.router.fitting import FitConfig
    from persona_router.router.onnx_encoder import DEFAULT_BACKEND

    return (not args.data and args.embedder in (None, DEFAULT_EMBEDDER) and args.encoder_backend == DEFAULT_BACKEND
            and config == FitConfig())


def _test_records(option: str | None, pack: Any, *, is_demo: bool) -> list[Any]:
    from persona_router.router.fitting import load_routing_records

    if option is not None and option.lower() == "none":
        return []
    if option is not None:
        return load_routing_records([option], pack)
    if not is_demo:
        return []
    from persona_router.core.rows import demo_routing

    return [r for r in demo_routing("test") if r.persona in pack]


def _report_markdown(router: Any, reports: list[Any], comparison: list[dict[str, Any]] | None) -> str:
    from persona_router.router.comparison import comparison_markdown, describe_classifier

    chosen = router.info["classifier"]
    thresholds = ", ".join(f"{name} {value:.2f}" for name, value in router.calibration.thresholds.items())
    calibration = router.calibration
    parts = [f"# Router for pack {router.pack.name!r}\n",
             f"Embedder {router.encoder.model_id} on {router.encoder.backend} ({router.encoder.fingerprint[:19]}…); "
             f"classifier {chosen['kind']} "
             f"({describe_classifier(chosen)}, chosen by cross-validated log-loss); temperature "
             f"{calibration.temperature:.3g}; target precision {calibration.target_precision:.2f}; "
             f"thresholds: {thresholds}.\n"]
    parts += [report.to_markdown() for report in reports]
    if comparison:
        parts += ["## Classifiers compared\n", comparison_markdown(comparison)]
    return "\n".join(parts)


def cmd_route(args: argparse.Namespace) -> int:
    from persona_router.core.pack import DEMO_PACK, load_pack
    from persona_router.router.fitting import ensure_router
    from persona_router.router.persona_router import PersonaRouter, fitted_pack

    if args.batch_size < 1:
        raise InvalidRequestError(f"{args.batch_size} must be at least 1", field="--batch-size")
    items = [Question(q, args.persona, f"{ARGUMENT}{n}") for n, q in enumerate(args.questions, start=1)]
    if args.input:
        items += list(_read_questions(args.input))
    if not items:
        raise InvalidRequestError("give questions as arguments or with --input FILE.jsonl", field="questions")
    # With --router alone, its own pack: a default pack would refuse any router fitted for another one.
    pack = fitted_pack(args.router) if args.router and args.pack is None else load_pack(args.pack or DEMO_PACK)
    _check_questions(items, pack)  # every row, before a decision is printed or a router fitted
    router = PersonaRouter.load(args.router, pack=pack) if args.router else ensure_router(pack)
    from tqdm import tqdm

    with tqdm(total=len(items), desc="routing", unit="q", file=sys.stderr,
              disable=len(items) <= ROUTE_CHUNK) as progress:
        for start in range(0, len(items), ROUTE_CHUNK):
            chunk = items[start:start + ROUTE_CHUNK]
            decisions = router.decide_batch([q.text for q in chunk], [q.persona for q in chunk],
                                            batch_size=args.batch_size)
            for question, decision in zip(chunk, decisions, strict=True):
                _print_decision(args.result_stream, question.text, decision.to_json(), as_json=args.json)
            progress.update(len(chunk))
    return 0


class Question(NamedTuple):
    """One question to route, the persona it names (if any) and where it came from, for errors."""

    text: str
    persona: str | None
    where: str


def _check_questions(items: list[Question], pack: Any) -> None:
    """Refuse blank questions and personas the pack lacks, naming the file's line or the argument."""
    valid = ", ".join(sorted(pack.names))
    for item in items:
        blank = not item.text.strip()
        unknown = item.persona is not None and item.persona not in pack
        if not (blank or unknown):
            continue
        message = "must be a non-empty string" if blank else \
            f"unknown persona {item.persona!r}; valid personas: {valid}"
        if item.where.startswith(ARGUMENT):
            raise InvalidRequestError(f"{item.where}: {message}", field="questions" if blank else "--persona")
        raise DataError(message, path=item.where, field="question" if blank else "persona")


def _print_decision(out: TextIO, question: str, decision: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        out.write(json.dumps({"question": question, **decision}, ensure_ascii=False) + "\n")
        return
    runner = f" (runner-up {decision['runner_up']} {decision['runner_up_score']:.2f})" if decision["runner_up"] else ""
    why = f" [{decision['reason']}]" if decision["reason"] else ""
    out.write(f"{decision['persona']}\t{decision['source']}\t{decision['confidence']:.2f}{runner}\t"
                     f"{question}{why}\n")


def _read_questions(source: str) -> Iterator[Question]:
    """A ``Question`` from each non-blank JSONL line; its JSON and field types checked by line number."""
    handle = sys.stdin if source == "-" else _open(source)
    try:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{source}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON ({exc.msg})", path=where) from exc
            if not isinstance(row, dict):
                raise DataError("each line must be a JSON object", path=where)
            question, persona = row.get("question"), row.get("persona")
            if not isinstance(question, str):  # a blank one is refused with the rest, by _check_questions
                raise DataError("must be a non-empty string", path=where, field="question")
            if persona is not None and not isinstance(persona, str):
                raise DataError("must be a string or absent", path=where, field="persona")
            yield Question(question, persona or None, where)
    finally:
        if handle is not sys.stdin:
            handle.close()


def _open(path: str) -> Any:
    try:
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror}", path=path) from exc
