"""TrainConfig: QLoRA defaults, device resolution, overrides from files and --set, field-naming errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from persona_router.cli.train import build_train_config, register
from persona_router.core.errors import ConfigError
from persona_router.training.config import CPU_DEFAULTS, TrainConfig, load_config_file, parse_set_options


def test_defaults_are_the_issue_qlora_settings() -> None:
    config = TrainConfig()
    assert (config.lora_r, config.lora_alpha, config.resolved("cuda").lora_dropout, config.target_modules) == (
        16, 32, 0.05, "all-linear")
    cuda = config.resolved("cuda")
    assert (cuda.learning_rate, cuda.lr_scheduler, cuda.warmup_ratio) == (2e-4, "cosine", 0.03)
    assert cuda.optim == "paged_adamw_8bit"
    assert cuda.mixed_precision == "bf16"
    assert cuda.gradient_checkpointing == "reentrant"  # checkpointing, of the kind measured fastest (config.py)
    assert (cuda.batch_size, cuda.grad_accum, cuda.max_length, cuda.max_steps) == (2, 4, 1024, None)
    assert config.resolved("cuda", bf16_supported=False).mixed_precision == "fp16"


def test_cpu_resolution_and_explicit_values_win() -> None:
    cpu = TrainConfig().resolved("cpu")
    assert cpu.optim == "adamw_torch" and cpu.mixed_precision == "no" and cpu.gradient_checkpointing == "off"
    assert cpu.max_steps is None and cpu.epochs == CPU_DEFAULTS["epochs"]
    assert cpu.learning_rate == CPU_DEFAULTS["learning_rate"]
    mine = TrainConfig(batch_size=7, optim="sgd").resolved("cpu")
    assert mine.batch_size == 7 and mine.optim == "sgd"
    # Explicit epochs mean "train by epochs": the CPU step budget must not cap them.
    assert TrainConfig(epochs=2.0).resolved("cpu").max_steps is None


@pytest.mark.parametrize(("field", "value"), [("lora_r", 0), ("lora_dropout", 1.5), ("lr_scheduler", "wavy"),
                                               ("optim", "adam9000"), ("max_length", 8), ("packing", "yes")])
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value})  # type: ignore[arg-type]
    assert field in str(info.value)


def test_overrides_from_toml_json_and_set(tmp_path: Path) -> None:
    toml = tmp_path / "train.toml"
    toml.write_text("[train]\nlora_r = 8\nlearning_rate = 1e-4\npacking = false\n", encoding="utf-8")
    data = load_config_file(toml)
    assert TrainConfig.from_mapping(data) == TrainConfig(lora_r=8, learning_rate=1e-4, packing=False)
    flat = tmp_path / "train.json"
    flat.write_text(json.dumps({"max_steps": 3}), encoding="utf-8")
    assert TrainConfig.from_mapping(load_config_file(flat)).max_steps == 3
    assert parse_set_options(["lora_alpha=64", "target_modules=qkv_proj,o_proj"]) == {
        "lora_alpha": 64, "target_modules": "qkv_proj,o_proj"}
    assert TrainConfig(target_modules="qkv_proj, o_proj").target_module_list() == ["qkv_proj", "o_proj"]


def test_unknown_setting_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown training settings \['lora_rank'\].*lora_r"):
        TrainConfig().with_overrides({"lora_rank": 4})
    with pytest.raises(ConfigError, match="not a number"):
        TrainConfig().with_overrides({"learning_rate": "fast"})


def test_cli_precedence_file_then_flags_then_set(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    conf = tmp_path / "c.toml"
    conf.write_text("lora_r = 8\nmax_steps = 50\nseed = 3\n", encoding="utf-8")
    args = parser.parse_args(["train", "--persona", "student", "--config", str(conf), "--epochs", "2",
                              "--lora-r", "4", "--set", "seed=9", "--no-packing"])
    config = build_train_config(args)
    assert (config.lora_r, config.epochs, config.max_steps, config.seed, config.packing) == (4, 2.0, None, 9, False)


def test_cpu_mixed_precision_follows_the_cpus_bf16_support() -> None:
    from persona_router.training.sft_setup import sft_config

    assert TrainConfig().resolved("cpu", bf16_supported=True).mixed_precision == "bf16"
    assert TrainConfig().resolved("cpu", bf16_supported=False).mixed_precision == "no"
    assert TrainConfig(mixed_precision="no").resolved("cpu", bf16_supported=True).mixed_precision == "no"
    assert TrainConfig().resolved("cpu").prompt_free_fraction == CPU_DEFAULTS["prompt_free_fraction"]
    assert TrainConfig().resolved("cuda").prompt_free_fraction == 0.0
    bf16 = sft_config(TrainConfig().resolved("cpu", bf16_supported=True), output_dir=Path("/tmp/x"), device="cpu")
    assert bf16.bf16 and not bf16.fp16 and bf16.use_cpu
    with pytest.raises(ConfigError, match="fp16 mixed precision needs CUDA"):
        sft_config(TrainConfig(mixed_precision="fp16").resolved("cpu"), output_dir=Path("/tmp/x"), device="cpu")
    with pytest.raises(ConfigError, match="prompt_free_fraction"):
        TrainConfig(prompt_free_fraction=1.5)


def test_cpu_bf16_probe_reads_torch() -> None:
    import torch
    from persona_router.training.cpu_precision import cpu_bf16_native, cpu_flags_summary

    flags = cpu_flags_summary()
    assert cpu_bf16_native() == (flags.get("avx512_bf16", False) or flags.get("amx_tile", False))
    assert flags.get("avx512_bf16") == torch.cpu._is_avx512_bf16_supported()


@pytest.mark.parametrize(("value", "enabled", "reentrant"), [("on", True, False), ("reentrant", True, True),
                                                             ("off", False, None)])
def test_gradient_checkpointing_modes_reach_trl(value: str, enabled: bool, reentrant: bool | None) -> None:
    from persona_router.training.sft_setup import sft_config

    args = sft_config(TrainConfig(gradient_checkpointing=value).resolved("cpu"), output_dir=Path("/tmp/x"),
                      device="cpu")
    assert args.gradient_checkpointing is enabled
    kwargs = args.gradient_checkpointing_kwargs
    assert (kwargs or {}).get("use_reentrant") == reentrant
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        TrainConfig(gradient_checkpointing="selective")


def test_a_step_count_records_no_epoch_default() -> None:
    """With max_steps, transformers ignores the epoch count: the resolved config (and so the manifest) must
    not claim the default one."""
    assert TrainConfig(max_steps=20).resolved("cpu").epochs is None
    assert TrainConfig().resolved("cpu").epochs == CPU_DEFAULTS["epochs"]
    assert TrainConfig(max_steps=20, epochs=3.0).resolved("cpu").epochs == 3.0  # as written
