"""``persona-router train`` and ``persona-router style-shift``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

from persona_router.adapters.offline_default import DEFAULT_BASE

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    train = subparsers.add_parser(
        "train", help="train persona LoRA adapters (QLoRA on CUDA) into the adapter registry",
        description="Train one LoRA adapter per persona with TRL's SFTTrainer (loss on the answer only) and "
        "publish it as <adapters>/<persona>/<version>/ with a manifest; LATEST moves only after success.")
    who = train.add_mutually_exclusive_group(required=True)
    who.add_argument("--persona", help="persona name from the pack")
    who.add_argument("--all", action="store_true",
                     help="every persona of the pack, spread over worker processes that each train whole "
                     "personas: one per visible GPU when there are several, else on a CPU one per core (one torch "
                     "thread each; --workers sets the count)")
    train.add_argument("--pack", default="demo",
                       help="persona pack: 'demo', 'user' ($PERSONA_ROUTER_HOME/packs/user.toml, made by "
                       "'persona add') or a TOML/YAML file (default: demo)")
    train.add_argument("--data", default=None,
                       help="training rows: a JSONL/JSON/CSV/Parquet file or a hub dataset id (default: the demo "
                       "dataset's train split)")
    train.add_argument("--eval-data", default=None,
                       help="held-out rows for eval loss (default: the demo test split with the demo data, else "
                       "a deterministic eval_fraction of --data)")
    train.add_argument("--adapters", default=None,
                       help="adapter registry folder (default: $PERSONA_ROUTER_ADAPTERS or "
                       "$PERSONA_ROUTER_HOME/adapters)")
    train.add_argument("--base", default=DEFAULT_BASE,
                       help=f"base model: {DEFAULT_BASE!r} (offline default), a local folder or a hub id "
                       "(default: %(default)s)")
    train.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: %(default)s")
    train.add_argument("--gpus", type=int, default=None, metavar="N",
                       help="train each persona on N GPUs with data parallelism (DDP): starts one process per GPU "
                       "through torch.distributed.run; the default accumulation (4) is split over the GPUs, so the "
                       "global batch stays the same when N divides it and is the nearest a per-GPU accumulation of "
                       "at least 1 allows otherwise (3 GPUs: 6 rows instead of 8, 8 GPUs: 16); an explicit "
                       "--grad-accum is per GPU; rank 0 publishes")
    train.add_argument("--workers", type=int, default=None, metavar="N",
                       help="with --all on a CPU: train N personas at once in N processes, the torch threads split "
                       "between them (default: one per core; 1 trains one persona after another)")
    train.add_argument("--quantization", default="auto", choices=("auto", "nf4", "bf16", "fp16", "fp32"),
                       help="base weights (default: nf4 on CUDA, fp32 on CPU)")
    steps = train.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, default=None, help="optimizer steps per persona (default: none; "
                       "--epochs decides)")
    steps.add_argument("--epochs", type=float, default=None, help="passes over each persona's rows (default: 1 on "
                       "CUDA, 2 on CPU)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint of an interrupted run with the same "
                       "settings; personas already published by that run are skipped")
    train.add_argument("--skip-missing", action="store_true",
                       help="with --all, skip personas that have no rows instead of failing")
    train.add_argument("--config", default=None, help="TOML or JSON file of training settings (see README)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any training setting, e.g. --set lora_r=8 (repeatable)")
    for flag, kind, text in (("--learning-rate", float, "peak learning rate (default: 2e-4 on CUDA, 1e-3 on CPU)"),
                             ("--batch-size", int, "per-device micro-batch (default: 2 on CUDA, 1 on CPU)"),
                             ("--grad-accum", int, "gradient accumulation steps, per GPU with --gpus (default: 4)"),
                             ("--max-length", int, "tokens per example, contexts cut to fit (default: 1024 on CUDA, "
                              "512 on CPU)"),
                             ("--lora-r", int, "LoRA rank (default: 16)"), ("--seed", int, "random seed (default: 0)")):
        train.add_argument(flag, type=kind, default=None, help=text)
    train.add_argument("--no-packing", dest="packing", action="store_false", default=None,
                       help="pad batches instead of packing examples")
    train.add_argument("--json", action="store_true", help="print the results as JSON")
    train.set_defaults(handler=cmd_train)

    shift = subparsers.add_parser(
        "style-shift", help="measure how far trained adapters moved toward their persona's style",
        description="Answer-token loss of each persona's latest adapter (and of the base) on every persona's "
        "held-out answers to the same shared questions; prints the matrix and per-persona specificity.")
    shift.add_argument("--adapters", default=None, help="adapter registry folder (default as for train)")
    shift.add_argument("--pack", default="demo", help="persona pack (default: demo)")
    shift.add_argument("--max-questions", type=int, default=10, help="shared test questions to score (default 10)")
    shift.add_argument("--out", default=None, help="also write the result as JSON to this file")
    shift.set_defaults(handler=cmd_style_shift)


def build_train_config(args: argparse.Namespace) -> Any:
    from persona_router.training.config import TrainConfig, load_config_file, parse_set_options

    overrides: dict[str, Any] = {}
    if args.config:
        overrides.update(load_config_file(args.config))
    flags = {"max_steps": args.max_steps, "epochs": args.epochs, "learning_rate": args.learning_rate,
             "batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_length": args.max_length,
             "lora_r": args.lora_r, "seed": args.seed, "packing": args.packing}
    if args.epochs is not None:
        overrides.pop("max_steps", None)  # --epochs on the command line beats a file's step budget
    if args.max_steps is not None:
        overrides.pop("epochs", None)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    overrides.update(parse_set_options(args.set))
    return TrainConfig().with_overrides(overrides, where="--config/--set")


def cmd_train(args: argparse.Namespace) -> int:
    from persona_router.adapters.base_model import BaseModelConfig, configure_threads, pick_device
    from persona_router.adapters.registry import AdapterRegistry
    from persona_router.core.errors import ConfigError, PersonaRouterError
    from persona_router.core.pack import load_pack
    from persona_router.training.distributed import leave_process_group, world
    from persona_router.training.jobs import plan_jobs
    from persona_router.training.parallel import Outcome, cpu_workers, raise_for_failures, train_spread, visible_gpus
    from persona_router.training.trainer import train_persona

    if args.gpus is not None and args.gpus < 1:
        raise ConfigError(f"{args.gpus} must be at least 1", field="--gpus")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"{args.workers} must be at least 1", field="--workers")
    # Everything that can be checked here is, before any rank starts: a bad option or persona is one clean
    # error (exit 2), not one per rank under torch.distributed.run's traceback.
    config = build_train_config(args)
    pack = load_pack(args.pack)
    names = list(pack.names) if args.all else [pack.get(args.persona).name]
    jobs = plan_jobs(pack, names, data=args.data, eval_data=args.eval_data, eval_fraction=config.eval_fraction,
                     skip_missing=args.skip_missing)
    if args.gpus is not None and args.gpus > 1 and not world().distributed:
        _check_gpus(args.gpus, pick_device(args.device), visible_gpus())
        return _launch_ranks(args.gpus, args.result_stream)
    base_config = BaseModelConfig(base=args.base, device=args.device, quantization=args.quantization)
    registry = AdapterRegistry(Path(args.adapters) if args.adapters else None)
    threads = configure_threads()
    outcomes: list[Outcome] = []
    device = pick_device(args.device)
    gpus = visible_gpus() if args.all and not world().distributed and device == "cuda" else []
    cpu_count = cpu_workers(len(jobs), threads if args.workers is None else args.workers) if device == "cpu" else 1
    # The trainer prints its per-step loss lines to stdout; keep stdout for the results (--json).
    with contextlib.redirect_stdout(sys.stderr):
        if len(gpus) > 1 and len(jobs) > 1:
            outcomes = train_spread(jobs, config, base_config, registry.root, devices=gpus[: len(jobs)],
                                    resume=args.resume)
        elif cpu_count > 1 and not world().distributed:
            outcomes = train_spread(jobs, config, base_config, registry.root, devices=[""] * cpu_count,
                                    resume=args.resume, threads=max(1, threads // cpu_count))
        else:
            for index, job in enumerate(jobs, start=1):
                log.info("[%d/%d] training %s on %d rows from %s", index, len(jobs), job.persona.name,
                         len(job.train_records), job.data_source)
                try:
                    outcomes.append(Outcome(index - 1, "", train_persona(job, config, base_config, registry,
                                                                         resume=args.resume)))
                except Exception as exc:  # as the parallel workers do: one failure (say out of memory) stops
                    if len(jobs) == 1:    # only its persona, and the summary names it
                        raise
                    log.error("%s did not train: %s; going on with the others", job.persona.name, exc,
                              exc_info=not isinstance(exc, PersonaRouterError))
                    error = str(exc) if isinstance(exc, PersonaRouterError) else f"{type(exc).__name__}: {exc}"
                    outcomes.append(Outcome(index - 1, "", error=error))
    leave_process_group()
    if not world().is_main:
        return 0  # rank 0 reports
    summary = [_summary(o.result) if o.error is None else {"persona": job.persona.name, "version": None, "path": None,
                                                           "skipped": None, "error": o.error}
               for job, o in zip(jobs, outcomes, strict=True)]
    if args.json:
        json.dump(summary, args.result_stream, indent=2)
        args.result_stream.write("\n")
    else:
        _print_table(summary, registry.root)
    raise_for_failures(jobs, outcomes)  # after the report of those that trained; exit status 2
    return 0


def _check_gpus(count: int, device: str, visible: list[str]) -> None:
    """Before starting ranks: each needs a GPU of its own (a rank on a missing GPU dies with a CUDA error)."""
    from persona_router.core.errors import ConfigError

    if device != "cuda":
        raise ConfigError(f"{count} asks for one process per GPU, but this run is on {device}; drop --gpus (CPU "
                          "training spreads personas over cores by itself)", field="--gpus")
    if count > len(visible):
        raise ConfigError(f"{count} GPUs asked for, {len(visible)} visible (CUDA_VISIBLE_DEVICES: "
                          f"{','.join(visible) or 'none'})", field="--gpus")


def _launch_ranks(count: int, results: TextIO) -> int:
    """Run this same command as ``count`` ranks under ``torch.distributed.run`` (one process per GPU); their
    stdout is this command's result stream (with ``--json``, the real stdout, not stderr). A failed rank is
    exit status 2, as a failed persona is in one process (its error is logged above)."""
    import subprocess

    argv, skip = [], False
    for item in sys.argv[1:]:  # the command line without --gpus
        if skip:
            skip = False
        elif item == "--gpus":
            skip = True
        elif not item.startswith("--gpus="):
            argv.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}",
               "-m", "persona_router", *argv]
    log.info("starting %d ranks: %s", count, " ".join(command))
    try:
        stdout: TextIO | None = results if results.fileno() >= 0 else None
    except (AttributeError, OSError, ValueError):  # an in-memory stream: the ranks keep this process's stdout
        stdout = None
    if stdout is not None:
        stdout.flush()
    code = subprocess.run(command, check=False, stdout=stdout).returncode
    if code != 0:
        log.error("a rank failed (torch.distributed.run exit status %d); its error is above", code)
    return 0 if code == 0 else 2


def cmd_style_shift(args: argparse.Namespace) -> int:
    from persona_router.adapters.base_model import configure_threads
    from persona_router.adapters.registry import AdapterRegistry
    from persona_router.core.pack import load_pack
    from persona_router.training.style_shift import format_report, measure_style_shift

    configure_threads()
    registry = AdapterRegistry(Path(args.adapters) if args.adapters else None)
    report = measure_style_shift(registry, load_pack(args.pack), max_questions=args.max_questions)
    print(format_report(report))
    if args.out:
        from persona_router.core.atomic import atomic_write_json

        atomic_write_json(Path(args.out), report)
    return 0


def _summary(result: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"persona": result.persona, "version": result.version,
                           "path": str(result.path) if result.path else None, "skipped": result.skipped}
    if result.manifest is not None:
        m = result.manifest.metrics
        row.update(eval_loss_before=m.eval_loss_before, eval_loss=m.eval_loss, train_loss=m.train_loss,
                   steps=m.steps, tokens_seen=m.tokens_seen, tokens_per_s=m.tokens_per_s, wall_time_s=m.wall_time_s)
    return row


def _print_table(rows: list[dict[str, Any]], root: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"adapters in {root}")
    for column in ("persona", "version", "eval loss before -> after", "steps", "tokens/s", "wall s", "note"):
        table.add_column(column)
    for row in rows:
        before, after = row.get("eval_loss_before"), row.get("eval_loss")
        losses = f"{before:.3f} -> {after:.3f}" if before is not None and after is not None else "n/a"
        table.add_row(row["persona"], str(row["version"]), losses, str(row.get("steps", "")),
                      f"{row.get('tokens_per_s', 0):.0f}", f"{row.get('wall_time_s', 0):.0f}",
                      row["skipped"] or (f"FAILED: {row['error']}" if row.get("error") else ""))
    Console().print(table)
