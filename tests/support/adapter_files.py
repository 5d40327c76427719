"""A minimal PEFT-shaped adapter folder (config + a safetensors file), for tests of folder checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def write_adapter_folder(folder: Path, *, config: dict[str, Any] | None = None,
                         tensors: dict[str, np.ndarray] | None = None) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": "base"} if config is None \
        else config
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    if tensors is None:
        tensors = {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": np.zeros((2, 4), np.float32),
                   "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight": np.zeros((4, 2), np.float32)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder
