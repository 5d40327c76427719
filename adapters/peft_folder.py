"""The one check of a PEFT LoRA adapter folder, shared by training, the registry's readers, both engines and
the evaluation's arm specs.

A usable folder holds ``adapter_config.json`` (a JSON object describing a LoRA adapter with a positive rank
``r`` and no ``modules_to_save``) and ``adapter_model.safetensors`` (a readable header listing at least one
tensor, all of them LoRA factors). Only the header is read, so the check costs milliseconds whatever the
adapter's size; the engines read the tensors themselves when they load them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from persona_router.core.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict; ``AdapterError`` when missing, unreadable or not a JSON object."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"not a PEFT adapter folder ({CONFIG_FILE} is missing)", path=folder)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"unreadable {CONFIG_FILE} ({exc})", path=path) from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} is not a JSON object", path=path)
    return config


def check_adapter_folder(folder: Path) -> dict[str, Any]:
    """Validate a saved LoRA adapter folder (config and weights header); return its config."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    config_path = folder / CONFIG_FILE
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"only LoRA adapters are supported, not {config.get('peft_type')!r}", path=config_path,
                           field="peft_type")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"r={rank!r}: not a LoRA config (the rank must be a positive integer)", path=config_path,
                           field="r")
    if config.get("modules_to_save"):
        raise AdapterError(f"modules_to_save={config['modules_to_save']} would copy whole layers into the adapter "
                           "(vLLM and the batched engine refuse it)", path=config_path, field="modules_to_save")
    names = _tensor_names(folder / WEIGHTS_FILE)
    if not names:
        raise AdapterError(f"{WEIGHTS_FILE} holds no tensors", path=folder)
    others = [name for name in names if "lora_" not in name]
    if others:
        raise AdapterError(f"non-LoRA tensors in the adapter: {others[:3]}", path=folder / WEIGHTS_FILE)
    return config


def _tensor_names(path: Path) -> list[str]:
    if not path.is_file():
        raise AdapterError(f"{WEIGHTS_FILE} is missing", path=path.parent)
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as exc:
        raise AdapterError("reading adapter weights needs safetensors: pip install safetensors") from exc
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"corrupt {WEIGHTS_FILE} ({exc})", path=path) from exc


def adapter_rank(folder: Path) -> int:
    """The LoRA rank ``r`` in the folder's ``adapter_config.json``."""
    try:
        return int(json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"cannot read the LoRA rank ({exc})", path=folder) from exc
