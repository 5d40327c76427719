"""Read a standard PEFT LoRA folder into the engine's fused groups, refusing what the engine cannot apply.

The engine computes ``y = x W^T + s * (x A^T) B^T`` per linear group, exactly PEFT's vanilla LoRA. Variants
that change that formula (DoRA, LoRA bias, fan-in-fan-out, per-module rank or alpha patterns, extra trained
modules, base-mutating initialisations) are refused with ``AdapterError`` naming the field, so an adapter
is either applied exactly or not at all.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_router.adapters.peft_folder import CONFIG_FILE, WEIGHTS_FILE, read_adapter_config
from persona_router.core.errors import AdapterError

_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")
# Fields whose presence (truthy) means a LoRA variant the engine does not implement.
_UNSUPPORTED_TRUTHY = (
    "use_dora", "modules_to_save", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
    "layer_replication", "trainable_token_indices", "target_parameters", "alora_invocation_tokens",
    "use_qalora", "use_bdlora", "arrow_config", "kasa_config", "velora_config", "monteclora_config",
    "megatron_config",
)
# Initialisations that rewrite the base weights during training: the adapter is meaningless without them.
_BASE_MUTATING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter, fused per (layer, group): ``A`` is [rank_g, in], ``B`` is [out, rank_g] (CPU tensors)."""

    folder: Path
    rank: int
    scaling: float
    tensors: dict[tuple[int, str], tuple[Any, Any]]


@dataclass(frozen=True)
class GroupShape:
    """What the base model expects of one group: its parts as (module path, out_features), and in_features."""

    parts: tuple[tuple[str, int], ...]
    in_features: int


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's adapter config, read by the one shared reader (``adapters/peft_folder.py``); the checks
    below are what this engine can apply, on top of that folder check."""
    return read_adapter_config(folder)


def lora_scaling(config: dict[str, Any], path: Path) -> tuple[int, float]:
    """Validate the config and return (rank, scaling) as PEFT computes them."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"only LoRA adapters are supported, not {config.get('peft_type')!r}",
                           path=path, field="peft_type")
    for name in _UNSUPPORTED_TRUTHY:
        if config.get(name):
            raise AdapterError(f"{name}={config[name]!r} is not supported by the batched engine",
                               path=path, field=name)
    if config.get("bias", "none") != "none":
        raise AdapterError(f"bias={config['bias']!r} is not supported (only 'none')", path=path, field="bias")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise AdapterError(f"init_lora_weights={init!r} changes the base weights; convert the adapter to plain "
                           "LoRA first", path=path, field="init_lora_weights")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"r={rank!r} must be a positive integer", path=path, field="r")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise AdapterError(f"lora_alpha={alpha!r} must be a number", path=path, field="lora_alpha")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def load_adapter(folder: Path, *, groups: dict[str, GroupShape], num_layers: int, max_rank: int) -> AdapterWeights:
    """Read and check one adapter against the base's shapes; returns fused per-group tensors."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    rank, scaling = lora_scaling(read_config(folder), config_path)
    if rank > max_rank:
        raise AdapterError(f"rank {rank} exceeds the engine's max_rank {max_rank}", path=config_path, field="r")
    raw = _read_tensors(folder / WEIGHTS_FILE)
    owner = {path: (group, index) for group, shape in groups.items() for index, (path, _) in enumerate(shape.parts)}
    found: dict[tuple[int, str], dict[int, dict[str, Any]]] = {}
    for key, tensor in raw.items():
        match = _KEY.match(key)
        if match is None or match.group(2) not in owner:
            raise AdapterError(f"unsupported tensor {key!r} (the engine applies LoRA to "
                               f"{', '.join(sorted(owner))} only)", path=folder / WEIGHTS_FILE)
        layer = int(match.group(1))
        if layer >= num_layers:
            raise AdapterError(f"tensor {key!r} names layer {layer}; the base has {num_layers}",
                               path=folder / WEIGHTS_FILE)
        if not _finite(tensor):
            raise AdapterError(f"tensor {key!r} holds non-finite values (inf or NaN); a diverged training run? "
                               "retrain or publish an earlier version", path=folder / WEIGHTS_FILE)
        group, index = owner[match.group(2)]
        found.setdefault((layer, group), {}).setdefault(index, {})[match.group(3)] = tensor
    if not found:
        raise AdapterError("the adapter holds no LoRA weights", path=folder / WEIGHTS_FILE)
    tensors = {key: _fuse(parts, groups[key[1]], rank, folder) for key, parts in found.items()}
    return AdapterWeights(folder=folder, rank=rank, scaling=scaling, tensors=tensors)


def _finite(tensor: Any) -> bool:
    import torch

    return bool(torch.isfinite(tensor).all())


def _read_tensors(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterError(f"{WEIGHTS_FILE} is missing", path=path.parent)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"corrupt adapter weights ({exc})", path=path) from exc


def _fuse(parts: dict[int, dict[str, Any]], shape: GroupShape, rank: int, folder: Path) -> tuple[Any, Any]:
    """Stack the parts' A along rank and lay their B block-diagonally, so one product serves the group."""
    import torch

    n_parts = len(shape.parts)
    a = torch.zeros(n_parts * rank, shape.in_features, dtype=torch.float32)
    b = torch.zeros(sum(n for _, n in shape.parts), n_parts * rank, dtype=torch.float32)
    row = 0
    for index, (path, out_features) in enumerate(shape.parts):
        pair = parts.get(index)
        if pair is not None:
            if set(pair) != {"A", "B"}:
                raise AdapterError(f"{path}: lora_A and lora_B must come together", path=folder / WEIGHTS_FILE)
            _check_shape(pair["A"], (rank, shape.in_features), f"{path}.lora_A", folder)
            _check_shape(pair["B"], (out_features, rank), f"{path}.lora_B", folder)
            a[index * rank:(index + 1) * rank] = pair["A"].float()
            b[row:row + out_features, index * rank:(index + 1) * rank] = pair["B"].float()
        row += out_features
    return a, b


def _check_shape(tensor: Any, expected: tuple[int, int], name: str, folder: Path) -> None:
    if tuple(tensor.shape) != expected:
        raise AdapterError(f"{name} has shape {tuple(tensor.shape)}, the base needs {expected} (an adapter for "
                           "another base model?)", path=folder / WEIGHTS_FILE)
