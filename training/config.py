"""Training hyperparameters: QLoRA defaults on CUDA, small-and-fast defaults on CPU, all overridable.

Fields left as ``None`` mean "pick for the device" and are filled by :meth:`TrainConfig.resolved`; the
manifest records the resolved values. Precedence, lowest first: built-in defaults, ``--config FILE`` (TOML or
JSON, flat keys named like the fields, or under a ``[train]`` table), then CLI flags.

CUDA defaults follow QLoRA as the original project used it on Phi-3-mini (LoRA r=16, alpha=32, dropout 0.05,
all linear layers; lr 2e-4, cosine, 3 % warm-up, paged 8-bit AdamW, NF4 base with bf16 compute; 1,024 tokens
with gradient checkpointing; an effective batch of 8 as a micro-batch of 2 x accumulation 4) with these
changes: the loss covers the answer only, examples are packed without padding, attention over the packed rows
runs per example in FlashAttention's variable-length kernel instead of SDPA over a dense block-diagonal mask
(``training/cuda_kernels.py``), each decoder layer runs compiled (``training/regional_compile.py``), gradient
checkpointing is the reentrant kind (the forward runs without autograd; each layer is recomputed and
differentiated inside the backward), the first 4 layers' checkpointed inputs wait in host memory
(``training/offload.py``), and TRL's metrics are read once per log line instead of once per micro-batch
(``deferred_metrics``, ``training/lean_trainer.py``). They are the fastest configuration that
benchmarks/train_gpu.py measured at or under the notebook's peak GPU memory on an H200
(``varlen-compile-lean-reent-off4-b2``: 2.47x the notebook's tokens/s at 3.050 vs 3.067 GiB, in one run;
without the offloaded inputs the same speed at 3.085 GiB). Liger's fused RMSNorm/SwiGLU kernels are opt-in
(``liger_kernels=on``): they were the default before compiled layers (1.22x the notebook in that run), and
compiled layers fuse the same element-wise work; asking for them keeps the layers eager. Data-parallel runs
(several GPUs) keep the defaults from before compiled layers: non-reentrant checkpointing, eager layers, Liger
(``_keep_measured_combinations``). A micro-batch of 4 (``batch_size=4, grad_accum=2``) trains
faster again but needs about 3.8 GiB.
README's GPU benchmark section has every measured alternative.

CPU defaults (the offline 135M base; bf16 autocast on CPUs with native bf16, float32 elsewhere) are sized so
``persona-router train --all`` on the demo pack (5 personas x 80 rows, about 85k tokens per epoch) stays within
15 minutes on 2 free cores. One process trained two epochs in 17.2 minutes on a 2-core Xeon with AMX (its
torch pool over both cores ran 150-205 tokens/s); ``train --all`` now trains one persona per core at once, one
torch thread each (``training/parallel.py``: 1.33-1.66x the tokens/s of one 2-thread process), so two epochs fit
(``benchmarks/train_all_cpu.py``). 1.5 epochs measured worse on the quality benchmark (judge accuracy 0.57 vs
0.64); README's training section shows the measurements and the learning curve.
No gradient checkpointing on CPU: memory is plentiful there and recomputation costs a third.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from persona_router.core.errors import ConfigError, choices

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
OPTIMIZERS = ("auto", "paged_adamw_8bit", "adamw_8bit", "adamw_torch", "adamw_torch_fused", "sgd")
SWITCHES = ("auto", "on", "off")
MIXED_PRECISIONS = ("auto", "bf16", "fp16", "no")
ATTENTIONS = ("auto", "sdpa", "varlen", "eager")
CHECKPOINTING = ("auto", "on", "off", "reentrant")

# Per-device defaults for the fields left as None.
CUDA_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-4, "batch_size": 2, "grad_accum": 4, "max_length": 1024, "epochs": 1.0,
    "optim": "paged_adamw_8bit", "gradient_checkpointing": "reentrant", "mixed_precision": "bf16",
    "save_steps": 50, "prompt_free_fraction": 0.0, "lora_dropout": 0.05,
    # CUDA-only speed settings (training/cuda_kernels.py); benchmarks/train_gpu.py measured each one.
    "attention": "varlen", "liger_kernels": "off", "activation_offloading": "off",
    "compile_layers": "on", "deferred_metrics": "on", "offload_layers": 4,
}
CPU_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-3, "batch_size": 1, "grad_accum": 4, "max_length": 512, "epochs": 2.0,
    "optim": "adamw_torch", "gradient_checkpointing": "off", "mixed_precision": "no", "save_steps": 10,
    "prompt_free_fraction": 0.5, "lora_dropout": 0.0, "attention": "varlen",
    # Compiling costs minutes of CPU time up front, more than a demo run gains. CPU training uses its own loss
    # (training/answer_loss.py), whose metric reads wait for no device.
    "compile_layers": "off", "deferred_metrics": "off", "offload_layers": 0,
}


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of one adapter's training run."""

    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float | None = None  # CUDA 0.05 (QLoRA); CPU 0.0: dropout masks cost ~15% of a CPU step
    target_modules: str = "all-linear"  # or a comma-separated list of module names
    # optimisation
    learning_rate: float | None = None  # CUDA 2e-4 (QLoRA); CPU 1e-3, so a few steps move a 135M model
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.001
    max_grad_norm: float = 0.3
    optim: str = "auto"
    # batches and duration (None: per-device default)
    batch_size: int | None = None  # per-device micro-batch (packed rows when packing)
    grad_accum: int | None = None
    max_length: int | None = None  # tokens per example; contexts are cut to fit, never question or answer
    epochs: float | None = None
    max_steps: int | None = None  # overrides epochs when set
    packing: bool = True  # best-fit packing without padding; attention never crosses examples
    # Rows (by question hash) trained without the persona's system prompt, so the adapter carries the style on
    # its own (None: CPU/demo 0.5, CUDA 0.0).
    prompt_free_fraction: float | None = None
    # "on": PyTorch's non-reentrant checkpointing; "reentrant": the forward runs without autograd and the
    # backward recomputes each layer and differentiates it on the spot (with compiled layers: a lighter
    # gradient-free forward graph, and nothing of a recomputation outlives its layer's backward).
    gradient_checkpointing: str = "auto"
    mixed_precision: str = "auto"
    # Speed settings (training/cuda_kernels.py): attention over packed rows ("varlen": each example attends to
    # itself only, no dense block-diagonal mask; FlashAttention's varlen kernel on CUDA, one causal SDPA call
    # per example on CPU), Liger's fused RMSNorm/SwiGLU kernels, and moving checkpointed activations to host
    # memory during the forward pass. The last two are CUDA-only.
    attention: str = "auto"
    liger_kernels: str = "auto"
    activation_offloading: str = "auto"
    # torch.compile of each decoder layer ("regional" compilation: the layers share one compiled graph, and the
    # recomputation under gradient checkpointing runs it too): one call per layer instead of hundreds of small
    # launches and Python frames, with the element-wise work fused (training/regional_compile.py).
    compile_layers: str = "auto"
    # Entropy, token accuracy and token counts kept on the device and read once per log line, instead of TRL's
    # per-micro-batch `.item()` calls, each of which makes the host wait for the GPU (training/lean_trainer.py).
    deferred_metrics: str = "auto"
    # With reentrant checkpointing: the checkpointed inputs of this many first decoder layers wait in pinned host
    # memory until the backward reaches them, which lowers the backward's peak by one layer input each
    # (training/offload.py). CUDA-only; 0 keeps them all on the device.
    offload_layers: int | None = None
    # evaluation and checkpoints
    eval_fraction: float = 0.1  # held out from a --data source that has no separate eval split
    eval_max_rows: int | None = None  # cap on eval rows (None: all)
    save_steps: int | None = None  # checkpoint cadence, for --resume (CUDA 50, CPU 10)
    logging_steps: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int(self, "lora_r")
        _positive_int(self, "lora_alpha")
        if self.lora_dropout is not None:
            _fraction(self, "lora_dropout", upper_open=True)
        if not self.target_modules.strip():
            raise ConfigError("must be 'all-linear' or a comma-separated list of module names", field="target_modules")
        if self.learning_rate is not None and not 0 < self.learning_rate < 1:
            raise ConfigError(f"{self.learning_rate} must be in (0, 1)", field="learning_rate")
        _choice(self, "lr_scheduler", SCHEDULERS)
        _fraction(self, "warmup_ratio", upper_open=True)
        if self.weight_decay < 0:
            raise ConfigError(f"{self.weight_decay} must be >= 0", field="weight_decay")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"{self.max_grad_norm} must be > 0", field="max_grad_norm")
        _choice(self, "optim", OPTIMIZERS)
        for name in ("batch_size", "grad_accum", "max_steps", "eval_max_rows"):
            if getattr(self, name) is not None:
                _positive_int(self, name)
        if self.max_length is not None and not 64 <= self.max_length <= 131072:
            raise ConfigError(f"{self.max_length} must be between 64 and 131072", field="max_length")
        if self.epochs is not None and not 0 < self.epochs <= 100:
            raise ConfigError(f"{self.epochs} must be in (0, 100]", field="epochs")
        if not isinstance(self.packing, bool):
            raise ConfigError(f"{self.packing!r} must be true or false", field="packing")
        _choice(self, "gradient_checkpointing", CHECKPOINTING)
        _choice(self, "mixed_precision", MIXED_PRECISIONS)
        _choice(self, "attention", ATTENTIONS)
        _choice(self, "liger_kernels", SWITCHES)
        _choice(self, "activation_offloading", SWITCHES)
        _choice(self, "compile_layers", SWITCHES)
        _choice(self, "deferred_metrics", SWITCHES)
        if self.offload_layers is not None:
            _count(self, "offload_layers")
            if self.offload_layers and self.gradient_checkpointing not in ("auto", "reentrant"):
                raise ConfigError(f"{self.offload_layers} needs gradient_checkpointing='reentrant' (the other kinds "
                                  "keep layer inputs out of autograd's reach)", field="offload_layers")
            if self.offload_layers and self.activation_offloading == "on":
                raise ConfigError("activation_offloading='on' already moves every checkpointed input; set "
                                  "offload_layers=0 or activation_offloading='off'", field="offload_layers")
        _fraction(self, "eval_fraction", upper_open=True)
        if self.prompt_free_fraction is not None and not 0 <= self.prompt_free_fraction <= 1:
            raise ConfigError(f"{self.prompt_free_fraction} must be in [0, 1]", field="prompt_free_fraction")
        if self.save_steps is not None:
            _positive_int(self, "save_steps")
        _positive_int(self, "logging_steps")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"{self.seed!r} must be an integer >= 0", field="seed")

    def resolved(self, device: str, *, bf16_supported: bool | None = None, world_size: int = 1) -> TrainConfig:
        """Fill every ``None``/``"auto"`` with the device's default; explicit values win.

        ``bf16_supported`` (None: assumed on CUDA, not on CPU) picks the mixed precision: bf16 or fp16 on CUDA,
        bf16 autocast or none on CPU. ``world_size`` > 1 (data parallelism): the default accumulation is split
        over the ranks (:func:`split_accumulation`), so the global batch (micro-batch x accumulation x ranks)
        stays what one process trains with when the rank count divides it, and comes as near as a whole
        accumulation of at least 1 allows otherwise; an explicit ``grad_accum`` is per rank, as written.
        """
        if bf16_supported is None:
            bf16_supported = device == "cuda"
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"{device!r} is not one of {choices(('cpu', 'cuda'))}", field="device")
        defaults = dict(CUDA_DEFAULTS if device == "cuda" else CPU_DEFAULTS)
        if device == "cuda" and not bf16_supported:
            defaults["mixed_precision"] = "fp16"
        if device == "cpu":
            # bf16 autocast only where the CPU has native bf16 instructions (training/cpu_precision.py).
            defaults["mixed_precision"] = "bf16" if bf16_supported else "no"
        updates: dict[str, Any] = {}
        for name, value in defaults.items():
            current = getattr(self, name)
            if name == "epochs" and self.max_steps is not None:
                continue  # a step count trains instead of epochs: recording an epoch default would be untrue
            if current is None or current == "auto":
                updates[name] = value
        if device == "cuda":
            _keep_measured_combinations(self, updates, world_size)
        if "offload_layers" in updates:
            checkpointing = updates.get("gradient_checkpointing", self.gradient_checkpointing)
            offloading = updates.get("activation_offloading", self.activation_offloading)
            if checkpointing != "reentrant" or offloading == "on":
                updates["offload_layers"] = 0  # only reentrant checkpointing saves layer inputs through autograd
        elif self.offload_layers:
            _check_explicit_offload(self, updates, device, world_size)
        if world_size > 1:
            _resolve_accumulation(self, updates, world_size)
        if updates.get("attention") == "varlen" and not self.packing:
            updates["attention"] = "sdpa"  # varlen attention is for packed rows; unpacked rows keep SDPA
        if updates.get("liger_kernels") == "on" and importlib.util.find_spec("liger_kernel") is None:
            log.warning("liger-kernel is not installed, so training runs without its fused kernels "
                        "(pip install 'persona-router[cuda]')")
            updates["liger_kernels"] = "off"
        return replace(self, **updates)

    def target_module_list(self) -> str | list[str]:
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, where: str = "config") -> TrainConfig:
        return cls().with_overrides(data, where=where)

    def with_overrides(self, data: dict[str, Any], *, where: str = "config") -> TrainConfig:
        """A copy with ``data``'s keys replaced; unknown keys are an error naming the valid ones."""
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown training settings {unknown}; valid: {', '.join(sorted(known))}", field=where)
        converted = {k: _convert(k, v, known[k].type) for k, v in data.items()}
        return replace(self, **converted)


def split_accumulation(default: int, world_size: int) -> int:
    """Per-rank accumulation for a default of ``default`` over ``world_size`` ranks: the one whose global batch
    is nearest to one process's (exact when ``world_size`` divides ``default``), at least 1 (e.g. 4 over 3
    ranks: 1, global 3/4 of one process's; over 8 ranks: 1, twice one process's)."""
    return max(1, round(default / world_size))


def _resolve_accumulation(config: TrainConfig, updates: dict[str, Any], world_size: int) -> None:
    """Split a default accumulation over the ranks and log the global batch that results."""
    batch = int(updates.get("batch_size", config.batch_size) or 1)
    if "grad_accum" not in updates:
        accum = int(config.grad_accum or 1)
        log.info("global batch: %d rows (micro-batch %d x accumulation %d as set, per rank, x %d ranks)",
                 batch * accum * world_size, batch, accum, world_size)
        return
    default = int(updates["grad_accum"])
    accum = updates["grad_accum"] = split_accumulation(default, world_size)
    if accum * world_size == default:
        log.info("global batch: %d rows (micro-batch %d x accumulation %d x %d ranks), as in one process",
                 batch * default, batch, accum, world_size)
        return
    log.warning("global batch: %d rows (micro-batch %d x accumulation %d x %d ranks), one process trains with %d: "
                "%d ranks do not divide the default accumulation %d, so this is the nearest (--grad-accum sets "
                "the per-rank accumulation)", batch * accum * world_size, batch, accum, world_size, batch * default,
                world_size, default)


def _keep_measured_combinations(config: TrainConfig, updates: dict[str, Any], world_size: int) -> None:
    """CUDA defaults left to ``auto`` that would pair a setting with one no run has measured together.

    Data-parallel runs (``world_size > 1``) keep the defaults from before compiled layers: non-reentrant
    checkpointing, eager layers, Liger's kernels. Reentrant checkpointing runs each layer's backward inside a
    nested backward call, which DistributedDataParallel supports only under conditions no multi-GPU run here has
    checked, and compiled layers under DDP are unchecked too. An explicit ``liger_kernels=on`` keeps eager
    layers: Liger's kernels inside compiled layers were never measured.
    """
    if world_size > 1:
        for name, value in (("gradient_checkpointing", "on"), ("compile_layers", "off"), ("liger_kernels", "on")):
            if name in updates:
                updates[name] = value
    if config.liger_kernels == "on" and "compile_layers" in updates:
        updates["compile_layers"] = "off"


def _check_explicit_offload(config: TrainConfig, updates: dict[str, Any], device: str, world_size: int) -> None:
    """An ``offload_layers`` the user set must fit what the rest resolved to; say which setting decided."""
    if device != "cuda":
        raise ConfigError(f"{config.offload_layers} moves checkpointed inputs from the GPU to host memory: it "
                          "needs CUDA; set 0 on CPU", field="offload_layers")
    checkpointing = updates.get("gradient_checkpointing", config.gradient_checkpointing)
    if checkpointing != "reentrant":
        why = (f"data-parallel runs ({world_size} ranks) default to gradient_checkpointing='on'"
               if world_size > 1 else f"gradient_checkpointing resolved to {checkpointing!r}")
        raise ConfigError(f"{config.offload_layers} needs gradient_checkpointing='reentrant' ({why}); set "
                          "gradient_checkpointing='reentrant' or offload_layers=0", field="offload_layers")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read overrides from a TOML or JSON file: flat keys, or keys under a ``train`` table."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("no such config file", field=str(path))
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot parse: {exc}", field=str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError("must hold a table/object of settings", field=str(path))
    table = data.get("train", data)
    if not isinstance(table, dict):
        raise ConfigError("'train' must be a table of settings", field=str(path))
    return table


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values parse as JSON when they can (numbers, true/false), else as text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item!r} must look like key=value", field="--set")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _convert(name: str, value: Any, annotation: Any) -> Any:
    kind = str(annotation)
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError("cannot be empty", field=name)
    if kind.startswith("bool"):
        if isinstance(value, str) and value.lower() in ("true", "false", "on", "off", "yes", "no"):
            return value.lower() in ("true", "on", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{value!r} must be true or false", field=name)
        return value
    try:
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{value!r} is not a number", field=name) from exc
    return str(value) if kind.startswith("str") else value


def _positive_int(config: TrainConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{value!r} must be an integer >= 1", field=name)


def _count(config: TrainConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{value!r} must be an integer >= 0", field=name)


def _fraction(config: TrainConfig, name: str, *, upper_open: bool) -> None:
    value = getattr(config, name)
    if not (0 <= value < 1 if upper_open else 0 <= value <= 1):
        raise ConfigError(f"{value} must be in [0, 1)", field=name)


def _choice(config: TrainConfig, name: str, valid: tuple[str, ...]) -> None:
    if getattr(config, name) not in valid:
        raise ConfigError(f"{getattr(config, name)!r} is not one of {choices(valid)}", field=name)
