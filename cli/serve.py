"""``persona-router serve``: run the HTTP service with uvicorn.

``--train-missing`` is the demo mode: the service starts at once (personas without an adapter answer
prompt-only) while a separate process trains the missing adapters one persona at a time; the service's
folder watcher hot-loads each as soon as it is published.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from persona_router.cli.common import add_base_arguments, add_pack_argument
from persona_router.service.settings import (
    DEFAULT_ROUTER_BACKEND,
    ENGINES,
    ROUTER_BACKENDS,
    ROUTER_MODES,
    ServiceSettings,
    load_ab_splits,
)

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the HTTP service (answers, OpenAI-compatible API, try-it page at /)",
        description="Serve answers over HTTP: POST /v1/answer, POST /v1/chat/completions, GET /v1/personas, "
        "GET /metrics, and a try-it page at /. Admin endpoints need PERSONA_ROUTER_ADMIN_TOKEN when it is set.")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--adapters", type=Path, default=None,
                       help="adapters folder (default: $PERSONA_ROUTER_ADAPTERS, else $PERSONA_ROUTER_HOME/adapters, "
                       "~/.cache/persona-router/adapters when neither is set)")
    add_pack_argument(serve)
    add_base_arguments(serve)
    serve.add_argument("--engine", default="auto", choices=ENGINES,
                       help="generation engine: fast (the batched engine: continuous batching, batched LoRA), "
                       "reference (HF generate), auto, or "
                       "vllm: hand generation to the vLLM servers given with --upstream (default: %(default)s)")
    serve.add_argument("--upstream", action="append", default=[], metavar="URL",
                       help="a vLLM server (http://host:port) for --engine vllm; repeat for several (see "
                       "'persona-router vllm-serve')")
    serve.add_argument("--upstream-max-inflight", type=int, default=8, metavar="N",
                       help="requests per upstream before a persona's requests spill over to its next upstream "
                       "(default: %(default)s)")
    serve.add_argument("--upstream-replicas", type=int, default=1, metavar="N",
                       help="upstreams each adapter is loaded on ahead of use (default: %(default)s)")
    serve.add_argument("--devices", default=None, metavar="LIST",
                       help="one in-process engine per device in one pool, requests placed by adapter affinity: "
                       "cuda:0,cuda:1,... or 'all' (every visible GPU); --max-batch applies per device")
    serve.add_argument("--upstream-wait", type=float, default=300.0, metavar="S",
                       help="seconds to wait at start for a healthy upstream before reporting not ready "
                       "(default: %(default)s)")
    serve.add_argument("--router", default="fitted", choices=ROUTER_MODES,
                       help="fitted: infer personas with the embedding router; fallback: no classifier, "
                       "unnamed personas go to the pack's fallback (default: %(default)s)")
    serve.add_argument("--router-backend", default=DEFAULT_ROUTER_BACKEND, choices=ROUTER_BACKENDS,
                       help="what runs the router's embedder: torch, onnx (float32) or onnx-int8 "
                       "(default: %(default)s)")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default: %(default)s)")
    serve.add_argument("--max-batch", type=int, default=8, help="rows per forward pass (default: %(default)s)")
    serve.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in s (default: %(default)s)")
    serve.add_argument("--max-resident-adapters", type=int, default=8,
                       help="adapters held in the engine at once (default: %(default)s)")
    serve.add_argument("--watch-interval", type=float, default=2.0,
                       help="seconds between checks of the adapters folder and of the pack and router files; 0: off "
                       "(default: %(default)s)")
    serve.add_argument("--max-new-tokens-limit", type=int, default=512,
                       help="largest max_new_tokens a request may ask for (default: %(default)s)")
    serve.add_argument("--ab", type=Path, default=None,
                       help="JSON file with live A/B splits: {persona, control, candidate, share, salt}; control "
                       "and candidate are published version numbers or 'latest' (checked at start-up: the versions "
                       "must exist, and 'latest' must not be the candidate); requests without a user are served the "
                       "control version outside the experiment")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="a Host name clients use to reach the server besides the bind address (repeatable); "
                       "other Host headers are refused (DNS rebinding)")
    serve.add_argument("--allow-open-admin", action="store_true",
                       help="start on a non-loopback address without PERSONA_ROUTER_ADMIN_TOKEN (refused otherwise)")
    serve.add_argument("--no-warmup", action="store_true", help="report ready without a warm-up generation")
    serve.add_argument("--train-missing", action="store_true",
                       help="demo mode: train adapters for personas that have none in a separate process while "
                       "serving; each is hot-loaded when it is published")
    serve.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                       help="extra argument for each background 'persona-router train' (repeatable), "
                       "e.g. --train-arg=--max-steps=20")
    serve.set_defaults(handler=cmd_serve)


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    overrides: dict[str, Any] = {
        "host": args.host, "port": args.port, "base": args.base, "device": args.device,
        "quantization": args.quantization, "pack": args.pack, "engine": args.engine, "router": args.router,
        "router_backend": args.router_backend,
        "max_queue": args.max_queue, "max_batch": args.max_batch, "request_timeout_s": args.timeout,
        "max_resident_adapters": args.max_resident_adapters, "watch_interval_s": args.watch_interval,
        "max_new_tokens_limit": args.max_new_tokens_limit, "warmup": not args.no_warmup,
        "default_max_new_tokens": min(128, args.max_new_tokens_limit),
        "upstreams": tuple(args.upstream), "upstream_max_in_flight": args.upstream_max_inflight,
        "upstream_replicas": args.upstream_replicas, "upstream_wait_s": args.upstream_wait,
        "allowed_hosts": tuple(args.allowed_host), "allow_open_admin": args.allow_open_admin,
    }
    if args.adapters is not None:
        overrides["adapters_dir"] = args.adapters
    if args.devices:
        from persona_router.adapters.base_model import expand_devices

        overrides["devices"] = expand_devices(args.devices)
    if args.ab is not None:
        overrides["ab_splits"] = load_ab_splits(args.ab)
    return ServiceSettings.from_env(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from persona_router.adapters.base_model import resolve_base
    from persona_router.adapters.registry import AdapterRegistry
    from persona_router.core.pack import load_pack
    from persona_router.service.ab_split import check_splits
    from persona_router.service.app import create_app

    settings = settings_from_args(args)
    pack = load_pack(settings.pack)  # fail with a clean message before uvicorn starts
    check_splits(settings.ab_splits, pack, AdapterRegistry(settings.adapters_dir))
    resolve_base(settings.base)
    if settings.engine == "vllm":
        from persona_router.adapters.vllm_upstream import without_credentials

        log.info("generation goes to %d vLLM upstream(s): %s; they must serve the same base (%s)",
                 len(settings.upstreams), ", ".join(map(without_credentials, settings.upstreams)), settings.base)
    if settings.host in ("0.0.0.0", "::", "[::]") and not settings.allowed_hosts:
        log.warning("bound to every interface with no --allowed-host: the Host check (DNS rebinding) is off; "
                    "name the host names clients use with --allowed-host")
    trainer = BackgroundTrainer(settings, pack.names, extra=args.train_arg) if args.train_missing else None
    if trainer is not None and settings.watch_interval_s == 0:
        log.warning("--train-missing with --watch-interval 0: new adapters load only on POST /v1/admin/adapters/reload")
    if trainer is not None:
        trainer.start()
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                    log_level="warning" if getattr(args, "quiet", False) else "info", timeout_graceful_shutdown=10)
    finally:
        if trainer is not None:
            trainer.stop()
    return 0


class BackgroundTrainer:
    """Train missing adapters one persona at a time, each in its own ``persona-router train`` process."""

    def __init__(self, settings: ServiceSettings, personas: tuple[str, ...], *, extra: list[str] | None = None) -> None:
        self.settings = settings
        self.personas = personas
        self.extra = list(extra or [])
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._starting = threading.Lock()  # a child starts, or the trainer stops: never both at once
        self._thread = threading.Thread(target=self._run, name="background-trainer", daemon=True)
        self.log_path = settings.adapters_dir / "train-missing.log"

    def missing(self) -> list[str]:
        from persona_router.adapters.registry import AdapterRegistry

        registry = AdapterRegistry(self.settings.adapters_dir)
        have = set(registry.personas())
        return [p for p in self.personas if p not in have]

    def command(self, persona: str) -> list[str]:
        # --resume: a server stopped mid-training left checkpoints that the next one continues from.
        return [sys.executable, "-m", "persona_router", "-q", "train", "--persona", persona,
                "--adapters", str(self.settings.adapters_dir), "--base", self.settings.base,
                "--pack", self.settings.pack, "--device", self.settings.device,
                "--quantization", self.settings.quantization, "--resume", *self.extra]

    def start(self) -> None:
        self.settings.adapters_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def _run(self) -> None:
        todo = self.missing()
        log.info("training adapters in the background for: %s (log: %s)", ", ".join(todo) or "none", self.log_path)
        with open(self.log_path, "ab") as sink:
            for persona in todo:
                with self._starting:
                    if self._stopping.is_set():
                        return
                    # Lower priority: answering requests matters more than finishing the demo training early.
                    self._process = subprocess.Popen(["nice", "-n", "10", *self.command(persona)], stdout=sink,
                                                     stderr=subprocess.STDOUT)
                code = self._process.wait()
                if code != 0 and not self._stopping.is_set():
                    log.error("training %s failed (exit %d); see %s", persona, code, self.log_path)
                elif code == 0:
                    log.info("trained %s; the service loads it at its next folder check", persona)

    def stop(self) -> None:
        with self._starting:
            self._stopping.set()
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        self._thread.join(timeout=15)
