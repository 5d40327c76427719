"""The service's settings: one frozen, validated record built from the CLI (or tests) before start-up."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from persona_router.adapters.offline_default import DEFAULT_BASE
from persona_router.adapters.registry import default_adapters_dir
from persona_router.core.errors import ConfigError, choices
from persona_router.router.onnx_encoder import BACKENDS as ROUTER_BACKENDS
from persona_router.router.onnx_encoder import DEFAULT_BACKEND as DEFAULT_ROUTER_BACKEND
from persona_router.service.ab_split import SplitConfig

ADMIN_TOKEN_ENV = "PERSONA_ROUTER_ADMIN_TOKEN"
ENGINES: tuple[str, ...] = ("auto", "reference", "fast", "vllm")
ROUTER_MODES: tuple[str, ...] = ("fitted", "fallback")
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+)$")
_HOST = re.compile(r"^[A-Za-z0-9.:\-\[\]]+$")


@dataclass(frozen=True)
class ServiceSettings:
    """Everything the service needs to start; validated here so a bad value fails before any model loads.

    ``engine``: ``reference`` (``adapters/engine_reference.py``: static batches through ``generate``),
    ``fast`` (``adapters/engine``: continuous batching), ``auto`` (fast when importable) or ``vllm``: a pool
    of vLLM servers at ``upstreams`` (``adapters/upstream_pool.py``), each taking ``upstream_max_in_flight``
    requests before the next spills over, each adapter loaded eagerly on ``upstream_replicas`` of them.
    ``devices``: one in-process engine per device (``cuda:0``, ``cuda:1``, ...) in the same pool, placed by the
    same rule (``max_batch`` requests per device before spill-over); ``device`` is then unused.
    ``router``: ``fitted`` loads (or fits once) the pack's embedding router; ``fallback`` skips the
    embedder and sends every request without a persona to the pack's fallback persona, saying so.
    ``router_backend``: what runs the fitted router's embedder (``router.onnx_encoder.BACKENDS``).
    ``watch_interval_s``: how often the adapters folder is checked for new versions (0 turns it off).
    ``ab_splits``: live A/B experiments (``service/ab_split.py``); their versions are checked here, at start-up.
    ``allowed_hosts``: Host names the server answers to besides its bind address (``service/protection.py``).
    ``allow_open_admin``: start on a non-loopback address without an admin token anyway (refused otherwise:
    anyone who can reach the port could load and unload adapters).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    adapters_dir: Path = field(default_factory=default_adapters_dir)
    base: str = DEFAULT_BASE
    device: str = "auto"
    quantization: str = "auto"
    pack: str = "demo"
    engine: str = "auto"
    router: str = "fitted"
    router_backend: str = DEFAULT_ROUTER_BACKEND
    max_queue: int = 64
    max_batch: int = 8
    request_timeout_s: float = 120.0
    max_resident_adapters: int = 8
    admin_token: str | None = None
    watch_interval_s: float = 2.0
    max_question_chars: int = 4000
    max_context_chars: int = 16000
    max_new_tokens_limit: int = 512
    default_max_new_tokens: int = 128
    warmup: bool = True
    ab_splits: tuple[SplitConfig, ...] = ()
    upstreams: tuple[str, ...] = ()
    upstream_max_in_flight: int = 8
    upstream_replicas: int = 1
    upstream_wait_s: float = 300.0
    allowed_hosts: tuple[str, ...] = ()
    allow_open_admin: bool = False
    devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.host or not _HOST.match(self.host):
            raise ConfigError(f"{self.host!r} is not a host name or IP address", field="host")
        for name in self.allowed_hosts:
            if not name or not _HOST.match(name):
                raise ConfigError(f"{name!r} is not a host name or IP address", field="allowed_hosts")
        if self.admin_token is None and not is_loopback(self.host) and not self.allow_open_admin:
            raise ConfigError(f"binding {self.host} without {ADMIN_TOKEN_ENV} would let anyone who reaches the "
                              "port load and unload adapters; set the token, or pass --allow-open-admin",
                              field="host")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{self.port} must be between 0 and 65535", field="port")
        if self.engine not in ENGINES:
            raise ConfigError(f"{self.engine!r} is not one of {choices(ENGINES)}", field="engine")
        if self.router not in ROUTER_MODES:
            raise ConfigError(f"{self.router!r} is not one of {choices(ROUTER_MODES)}", field="router")
        if self.router_backend not in ROUTER_BACKENDS:
            raise ConfigError(f"{self.router_backend!r} is not one of {choices(ROUTER_BACKENDS)}",
                              field="router_backend")
        _at_least(self.max_queue, 1, "max_queue")
        _at_least(self.max_batch, 1, "max_batch")
        _at_least(self.max_resident_adapters, 1, "max_resident_adapters")
        _at_least(self.max_question_chars, 1, "max_question_chars")
        _at_least(self.max_context_chars, 0, "max_context_chars")
        if not 1 <= self.max_new_tokens_limit <= 4096:
            raise ConfigError(f"{self.max_new_tokens_limit} must be between 1 and 4096", field="max_new_tokens_limit")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ConfigError(f"{self.default_max_new_tokens} must be between 1 and max_new_tokens_limit "
                              f"({self.max_new_tokens_limit})", field="default_max_new_tokens")
        if not 0.1 <= self.request_timeout_s <= 3600:
            raise ConfigError(f"{self.request_timeout_s} must be between 0.1 and 3600 s", field="request_timeout_s")
        if not 0.0 <= self.watch_interval_s <= 3600:
            raise ConfigError(f"{self.watch_interval_s} must be between 0 (off) and 3600 s", field="watch_interval_s")
        if self.admin_token is not None and len(self.admin_token) < 8:
            raise ConfigError("must be at least 8 characters (or unset to disable admin auth)",
                              field=ADMIN_TOKEN_ENV)
        if self.engine == "vllm" and not self.upstreams:
            raise ConfigError("--engine vllm needs at least one --upstream URL", field="upstreams")
        if self.upstreams and self.engine != "vllm":
            raise ConfigError("--upstream is only used with --engine vllm", field="upstreams")
        for url in self.upstreams:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"{url!r} is not an http(s):// URL", field="upstreams")
        if len(set(self.upstreams)) != len(self.upstreams):
            raise ConfigError("the same upstream URL is listed twice", field="upstreams")
        _at_least(self.upstream_max_in_flight, 1, "upstream_max_in_flight")
        _at_least(self.upstream_replicas, 1, "upstream_replicas")
        if not 0 <= self.upstream_wait_s <= 3600:
            raise ConfigError(f"{self.upstream_wait_s} must be between 0 and 3600 s", field="upstream_wait_s")
        if self.devices and self.engine == "vllm":
            raise ConfigError("--devices builds in-process engines; it does not go with --engine vllm", field="devices")
        for device in self.devices:
            if not _DEVICE.match(device):
                raise ConfigError(f"{device!r} is not cpu, cuda or cuda:N", field="devices")
        personas = [split.persona for split in self.ab_splits]
        if len(personas) != len(set(personas)):
            raise ConfigError("at most one A/B split per persona", field="ab_splits")
        object.__setattr__(self, "adapters_dir", Path(self.adapters_dir).expanduser().resolve())

    @classmethod
    def from_env(cls, **overrides: Any) -> ServiceSettings:
        """Settings with the admin token taken from ``PERSONA_ROUTER_ADMIN_TOKEN`` unless given."""
        overrides.setdefault("admin_token", os.environ.get(ADMIN_TOKEN_ENV) or None)
        return cls(**overrides)

    def with_overrides(self, **changes: Any) -> ServiceSettings:
        return replace(self, **changes)


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach: ``localhost`` and loopback addresses
    (parsed: a prefix test would take the name ``127.example.com`` for one)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def load_ab_splits(path: str | Path) -> tuple[SplitConfig, ...]:
    """Read a JSON file holding one split object or a list of them; validated by ``SplitConfig``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the A/B split file: {exc}", path=path, field="ab") from exc
    items = raw if isinstance(raw, list) else [raw]
    if not all(isinstance(item, dict) for item in items):
        raise ConfigError("must hold a JSON object or a list of objects", path=path, field="ab")
    splits = []
    for item in items:
        try:
            splits.append(SplitConfig.from_json(item))
        except ConfigError as exc:  # name the file: the split is wrong there, not on the command line
            raise ConfigError(exc.message, path=path, field=exc.field) from exc
    return tuple(splits)


def _at_least(value: int, lower: int, name: str) -> None:
    if value < lower:
        raise ConfigError(f"{value} must be at least {lower}", field=name)
