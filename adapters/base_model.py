"""Resolve and load the shared base model.

``--base`` takes the built-in offline default (``smollm2-135m-instruct``), a local model folder, or a hub
id such as ``microsoft/Phi-3-mini-4k-instruct``. On CUDA the base loads in 4-bit NF4 with double
quantisation through bitsandbytes (the QLoRA path). On CPU it loads in float32 by default: bitsandbytes'
CPU NF4 kernels work but are several times slower than float32 for a model this small, and CPU float32
keeps greedy outputs exactly reproducible. The batched service is the exception: on a CPU with native bf16
(AMX-BF16 or AVX512-BF16) it serves in bfloat16 (see ``pick_precision``). The choice is logged.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from persona_router.adapters.offline_default import DEFAULT_BASE, ensure_offline_default
from persona_router.core.errors import BaseModelError, ConfigError, choices
from persona_router.core.fingerprint import fingerprint_folder

log = logging.getLogger(__name__)

Quantization = Literal["auto", "nf4", "bf16", "fp16", "fp32"]
Device = Literal["auto", "cpu", "cuda"]
QUANTIZATIONS: tuple[str, ...] = ("auto", "nf4", "bf16", "fp16", "fp32")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CUDA_INDEX = re.compile(r"^cuda:\d+$")  # one GPU of several (serve --devices)


@dataclass(frozen=True)
class BaseModelConfig:
    """How to load the base: which model, on which device, at which precision."""

    base: str = DEFAULT_BASE
    device: str = "auto"
    quantization: str = "auto"
    double_quant: bool = True

    def __post_init__(self) -> None:
        if not self.base or not self.base.strip():
            raise ConfigError("must name a model", field="base")
        if self.device not in DEVICES and not _CUDA_INDEX.match(self.device):
            raise ConfigError(f"{self.device!r} is not one of {choices(DEVICES)} or cuda:N", field="device")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"{self.quantization!r} is not one of {choices(QUANTIZATIONS)}", field="quantization")


@dataclass(frozen=True)
class ResolvedBase:
    """A base model located on disk."""

    name: str  # what the user asked for: alias, path or hub id
    folder: Path
    fingerprint: str


@dataclass
class LoadedBase:
    """A base model in memory with its tokenizer and identity."""

    model: Any
    tokenizer: Any
    resolved: ResolvedBase
    device: str
    precision: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.resolved.name

    @property
    def fingerprint(self) -> str:
        return self.resolved.fingerprint


def resolve_base(base: str) -> ResolvedBase:
    """Find the base on disk: build the offline default, use a local folder, or fetch a hub snapshot."""
    if base == DEFAULT_BASE:
        folder = ensure_offline_default()
    else:
        path = Path(base).expanduser()
        if path.is_dir():
            folder = path.resolve()
        elif _HUB_ID.match(base) and not path.exists():
            folder = _hub_snapshot(base)
        else:
            raise BaseModelError(
                f"no such model folder, and not a hub id (owner/name); the offline default is {DEFAULT_BASE!r}",
                path=base,
                field="base",
            )
    if not (folder / "config.json").is_file():
        raise BaseModelError("not a model folder: config.json is missing", path=folder, field="base")
    return ResolvedBase(name=base, folder=folder, fingerprint=fingerprint_folder(folder))


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise BaseModelError("loading from the hub needs huggingface_hub: pip install huggingface_hub") from exc
    try:
        local = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]
        )
    except Exception as exc:
        raise BaseModelError(
            f"could not fetch {repo_id!r} from the model hub ({type(exc).__name__}: {exc}); "
            "offline, pass a local folder or the default 'smollm2-135m-instruct'",
            field="base",
        ) from exc
    return Path(local)


def pick_device(device: str) -> str:
    if device != "auto":
        if device.startswith("cuda") and not _cuda_available():
            raise ConfigError("CUDA was requested but torch sees no GPU", field="device")
        if _CUDA_INDEX.match(device) and int(device.split(":")[1]) >= _cuda_count():
            raise ConfigError(f"{device} does not exist: torch sees {_cuda_count()} GPU(s)", field="device")
        return device
    return "cuda" if _cuda_available() else "cpu"


def pick_precision(quantization: str, device: str, *, serving: bool = False) -> str:
    """``auto``: NF4 on CUDA; on CPU float32, except for batched serving on a CPU with native bf16.

    Measured with the batched engine (``benchmarks/decode_cpu.py``): on a CPU with AMX-BF16, bf16 gave 1.8x
    the tokens/s at 16 rows, about the same at batch 1 (slower in an earlier, busier run), and its greedy
    answers drift from float32's; so it is the default only where requests are batched (the service), and
    one-off generation, evaluation, training and the exactness tests keep float32.
    """
    if quantization != "auto":
        return quantization
    if device.startswith("cuda"):
        return "nf4"
    return "bf16" if serving and cpu_bf16_support()["native"] else "fp32"


def load_base(config: BaseModelConfig, *, for_training: bool = False, serving: bool = False) -> LoadedBase:
    """Load model and tokenizer once; the caller shares them across adapters (``serving``: the batched service)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_base(config.base)
    device = pick_device(config.device)
    precision = pick_precision(config.quantization, device, serving=serving and not for_training)
    kwargs: dict[str, Any] = {}
    if precision == "nf4":
        kwargs["quantization_config"] = nf4_config(double_quant=config.double_quant)
        kwargs["dtype"] = torch.bfloat16 if device.startswith("cuda") else torch.float32
        if device.startswith("cuda"):
            # An explicit cuda:N, else the current device: GPU 0 in one process, the rank's own GPU under a
            # distributed launch.
            kwargs["device_map"] = {"": int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()}
    else:
        kwargs["dtype"] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    if device == "cpu" and config.quantization == "auto" and precision == "bf16":
        flags = [k.upper().replace("_", "-") for k, v in cpu_bf16_support().items() if v and k != "native"]
        log.info("CPU: serving %s in bfloat16 (this CPU has %s; batched decoding is faster than in float32); "
                 "pass --quantization fp32 for float32", resolved.name, " and ".join(flags))
    elif device == "cpu" and config.quantization == "auto":
        log.info(
            "CPU: loading %s in float32 (bitsandbytes NF4 runs on CPU but slower, and fp32 keeps greedy "
            "decoding exact); pass --quantization nf4 to use 4-bit anyway",
            resolved.name,
        )
    else:
        log.info("loading %s on %s at %s", resolved.name, device, precision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.folder)
        model = AutoModelForCausalLM.from_pretrained(resolved.folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"could not load the model: {exc}", path=resolved.folder, field="base") from exc
    if precision != "nf4":
        model.to(device)  # type: ignore[arg-type]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not for_training:
        model.eval()
    return LoadedBase(model=model, tokenizer=tokenizer, resolved=resolved, device=device, precision=precision)


def load_base_meta(config: BaseModelConfig) -> LoadedBase:
    """The base's tokenizer and configs without its weights, for a service whose upstreams generate
    (``serve --engine vllm``): ``model`` is None, ``extra`` holds ``config`` and ``generation_config``."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    resolved = resolve_base(config.base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.folder)
        model_config = AutoConfig.from_pretrained(resolved.folder)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"could not load the tokenizer or config: {exc}", path=resolved.folder,
                             field="base") from exc
    try:
        generation_config: Any = GenerationConfig.from_pretrained(resolved.folder)
    except OSError:
        generation_config = None  # no generation_config.json: the tokenizer's EOS is the stop token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedBase(model=None, tokenizer=tokenizer, resolved=resolved, device="upstream", precision="upstream",
                      extra={"config": model_config, "generation_config": generation_config})


def nf4_config(*, double_quant: bool = True, compute_dtype: str = "bfloat16") -> Any:
    """The QLoRA quantisation config: NF4, double quantisation, bf16 compute."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise BaseModelError("4-bit loading needs bitsandbytes: pip install bitsandbytes==0.50.2") from exc
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def cpu_bf16_support() -> dict[str, Any]:
    """Whether this CPU multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16); without either, torch emulates
    bf16 with conversions and float32 is faster."""
    flags = _cpu_flags()
    if flags is None:  # no /proc/cpuinfo: ask torch (private helpers, so looked up defensively)
        import torch

        amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        avx512 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    else:
        amx, avx512 = "amx_bf16" in flags, "avx512_bf16" in flags
    return {"amx_bf16": amx, "avx512_bf16": avx512, "native": amx or avx512}


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _cuda_count() -> int:
    import torch

    return int(torch.cuda.device_count())


def expand_devices(spec: str) -> tuple[str, ...]:
    """``--devices``: a comma-separated list (``cuda:0,cuda:1``, ``cpu,cpu``) or ``all`` (every visible GPU)."""
    if spec.strip() == "all":
        count = _cuda_count() if _cuda_available() else 0
        if count == 0:
            raise ConfigError("'all' needs CUDA GPUs; torch sees none", field="devices")
        return tuple(f"cuda:{i}" for i in range(count))
    devices = tuple(d.strip() for d in spec.split(",") if d.strip())
    if not devices:
        raise ConfigError("name at least one device", field="devices")
    return devices


def configure_threads(default: int | None = None, *, reserve: int = 0) -> int:
    """Use the cores we have once; two busy torch pools on 2 cores collapse throughput.

    ``reserve`` cores are left to other busy threads of this process (the HTTP server's event loop,
    tokenizers): a torch pool that spans every core stalls at each parallel region while one of its
    threads is preempted. ``PERSONA_ROUTER_THREADS`` overrides both.
    """
    import torch

    cores = usable_cores()
    raw = os.environ.get("PERSONA_ROUTER_THREADS")
    if raw is not None and not (raw.strip().isdigit() and int(raw) >= 1):
        raise ConfigError(f"{raw!r} must be a whole number of threads, at least 1", field="PERSONA_ROUTER_THREADS")
    wanted = int(raw) if raw is not None else default or max(1, cores - reserve)
    torch.set_num_threads(wanted)
    return wanted


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (``taskset``, a container's cpuset), not the
    machine's count, which would oversubscribe a process pinned to a few cores."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # platforms without affinity
        return os.cpu_count() or 1
