"""The ``persona-router`` command line. Each area's sub-commands live in their own module of this package and
register themselves here; heavy libraries load only inside the command that needs them, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

from persona_router.core.errors import PersonaRouterError

# Modules that define ``register(subparsers)``; each adds its own sub-commands.
COMMAND_MODULES = (
    "persona_router.cli.common",
    "persona_router.cli.persona",
    "persona_router.cli.route",
    "persona_router.cli.serve",
    "persona_router.cli.eval",
    "persona_router.cli.train",
    "persona_router.cli.vllm_serve",
)

log = logging.getLogger("persona_router")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persona-router",
        description="Answer questions in the style of the asker's persona: one shared base model, one LoRA "
        "adapter per persona, an embedding router that infers the persona when none is named.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    try:
        from rich.console import Console
        from rich.logging import RichHandler

        # stdout is the command's output (``--json`` lines); logs never go there.
        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False,
                                               rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    except ImportError:  # pragma: no cover - rich is a dependency
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("persona_router").setLevel(level)
    # Libraries' progress bars and advisory warnings would drown the answer on stdout/stderr.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


@contextlib.contextmanager
def stdout_for_results() -> Iterator[TextIO]:
    """Keep stdout for the command's results (``--json`` lines) while the command runs.

    Whatever else would reach stdout goes to stderr: a library's ``print`` (``sys.stdout`` points at stderr)
    and a native library writing to file descriptor 1 (it is pointed at stderr too). The yielded stream
    writes to the real stdout.
    """
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, io.UnsupportedOperation):  # stdout replaced by an in-memory stream (tests)
        fd = None
    previous = sys.stdout
    if fd is None:
        sys.stdout = sys.stderr
        try:
            yield previous
        finally:
            sys.stdout = previous
        return
    saved = os.dup(fd)
    os.dup2(sys.stderr.fileno(), fd)
    results = open(saved, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 - closed below, before the fd
    sys.stdout = sys.stderr
    try:
        yield results
    finally:
        sys.stdout = previous
        try:
            results.close()  # flushes; closefd=False leaves ``saved`` open
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        if getattr(args, "json", False):
            with stdout_for_results() as args.result_stream:
                return int(args.handler(args) or 0)
        args.result_stream = sys.stdout
        return int(args.handler(args) or 0)
    except PersonaRouterError as exc:
        print(f"persona-router {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away; exit quietly like other Unix tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
