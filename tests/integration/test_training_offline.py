"""A few real optimizer steps on the offline SmolLM2 base (Phi-3 layout): the demo path end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from persona_router.adapters.base_model import BaseModelConfig
from persona_router.adapters.registry import AdapterRegistry
from persona_router.core.pack import load_pack
from persona_router.training.config import TrainConfig
from persona_router.training.jobs import plan_jobs


@pytest.mark.slow
def test_offline_base_trains_and_lowers_held_out_answer_loss(tmp_path: Path) -> None:
    from persona_router.training.trainer import train_persona

    (job,) = plan_jobs(load_pack(), ["clinician"])
    config = TrainConfig(max_steps=2, batch_size=1, grad_accum=1, eval_max_rows=4, max_length=512)
    result = train_persona(job, config, BaseModelConfig(), AdapterRegistry(tmp_path))
    assert result.manifest is not None
    metrics = result.manifest.metrics
    assert metrics.eval_loss is not None and metrics.eval_loss_before is not None
    assert metrics.eval_loss < metrics.eval_loss_before  # held-out clinician answers became more likely
    adapter_config = json.loads((result.path / "adapter_config.json").read_text())  # type: ignore[operator]
    assert adapter_config["modules_to_save"] is None
    assert set(adapter_config["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert result.manifest.base_model == "smollm2-135m-instruct"
