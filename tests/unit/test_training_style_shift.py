"""The style-shift report: shared held-out questions, a loss matrix, specificity, refused bases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from persona_router.adapters.manifest import AdapterManifest, DatasetInfo, TrainMetrics, write_manifest
from persona_router.adapters.registry import AdapterRegistry
from persona_router.core.errors import AdapterError
from persona_router.core.fingerprint import fingerprint_folder
from persona_router.core.pack import load_pack
from persona_router.training.style_shift import format_report, measure_style_shift, shared_questions


def publish_random(registry: AdapterRegistry, base_dir: Path, persona: str, seed: int, fingerprint: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    staged = registry.staging_dir(persona)
    peft_model.save_pretrained(str(staged))
    write_manifest(staged, AdapterManifest(
        persona=persona, version=1, base_model=str(base_dir), base_fingerprint=fingerprint,
        dataset=DatasetInfo(source="test", sha256="x", rows_train=1, rows_eval=0, eval_source="none"),
        hyperparameters={}, device="cpu", precision="fp32", library_versions={},
        metrics=TrainMetrics(train_loss=None, eval_loss=None, eval_loss_before=None, steps=0, epochs=0.0,
                             tokens_seen=0, wall_time_s=0.0, tokens_per_s=0.0, peak_memory_mb=0.0,
                             peak_memory_kind="process_max_rss")))
    registry.publish(persona, staged)


def test_shared_questions_are_answered_by_every_persona() -> None:
    questions = shared_questions(["student", "clinician"], max_questions=3)
    assert len(questions) == 3
    for rows in questions.values():
        assert set(rows) == {"student", "clinician"}
        assert rows["student"].question == rows["clinician"].question  # the same question, two registers


def test_report_on_two_adapters(tiny_model_dir: Path, tmp_path: Path, isolated_home: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    fingerprint = fingerprint_folder(tiny_model_dir)
    pack = load_pack()
    with pytest.raises(AdapterError, match="at least two personas"):
        measure_style_shift(registry, pack)
    publish_random(registry, tiny_model_dir, "student", 1, fingerprint)
    publish_random(registry, tiny_model_dir, "clinician", 2, fingerprint)
    report = measure_style_shift(registry, pack, max_questions=1, device="cpu")
    assert report["personas"] == ["student", "clinician"] and len(report["questions"]) == 1
    for p in report["personas"]:
        for q in report["personas"]:
            gain = report["gain"][p][q]
            assert math.isclose(gain, report["base_loss"][p][q] - report["adapter_loss"][p][q], abs_tol=1e-3)
        assert report["own_top1"]["base"][p] in (0.0, 1.0)
    assert "specificity" in format_report(report)
