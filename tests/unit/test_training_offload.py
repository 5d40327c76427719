"""Checkpointed inputs of the first layers in host memory (``offload_layers``, training/offload.py).

The setting must not change what is learnt: with reentrant checkpointing the gradients equal those of the same
model without it, to the last bit on CPU (float32), and only the chosen layers' inputs move. On CUDA the memory
live when the backward reaches the last layer (where LoRA training peaks) must fall by the moved inputs' size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from persona_router.core.errors import ConfigError
from persona_router.training.config import TrainConfig
from persona_router.training.cuda_kernels import prepare_model
from persona_router.training.offload import OffloadedCheckpoint, offload_first_layers


def test_setting_validates_and_defaults_per_checkpointing() -> None:
    cuda = TrainConfig().resolved("cuda")
    assert (cuda.gradient_checkpointing, cuda.offload_layers) == ("reentrant", 4)
    assert TrainConfig().resolved("cpu").offload_layers == 0
    # The default follows the checkpointing kind: asking for another kind is not an error about this field.
    assert TrainConfig(gradient_checkpointing="on").resolved("cuda").offload_layers == 0
    assert TrainConfig(activation_offloading="on").resolved("cuda").offload_layers == 0
    two_gpus = TrainConfig().resolved("cuda", world_size=2)
    assert (two_gpus.gradient_checkpointing, two_gpus.offload_layers, two_gpus.compile_layers) == ("on", 0, "off")
    # Liger's kernels were never measured inside compiled layers: asking for them keeps the layers eager.
    assert TrainConfig(liger_kernels="on").resolved("cuda").compile_layers == "off"
    assert TrainConfig(liger_kernels="on", compile_layers="on").resolved("cuda").compile_layers == "on"
    assert TrainConfig(offload_layers=2, gradient_checkpointing="reentrant").resolved("cuda").offload_layers == 2
    with pytest.raises(ConfigError, match=r"offload_layers.*>= 0"):
        TrainConfig(offload_layers=-1)
    with pytest.raises(ConfigError, match=r"offload_layers.*reentrant"):
        TrainConfig(offload_layers=2, gradient_checkpointing="on")
    with pytest.raises(ConfigError, match=r"offload_layers.*activation_offloading"):
        TrainConfig(offload_layers=2, gradient_checkpointing="reentrant", activation_offloading="on")
    assert TrainConfig().with_overrides({"offload_layers": "3"}).offload_layers == 3


def test_an_explicit_count_names_what_rules_it_out() -> None:
    with pytest.raises(ConfigError, match=r"offload_layers.*data-parallel runs \(2 ranks\)"):
        TrainConfig(offload_layers=2).resolved("cuda", world_size=2)
    assert TrainConfig(offload_layers=2, gradient_checkpointing="reentrant").resolved(
        "cuda", world_size=2).offload_layers == 2
    with pytest.raises(ConfigError, match=r"offload_layers.*needs CUDA"):
        TrainConfig(offload_layers=2).resolved("cpu")


def test_cpu_training_refuses_it(tiny_model_dir: Path) -> None:
    from dataclasses import replace

    with pytest.raises(ConfigError, match=r"offload_layers.*CUDA"):
        TrainConfig(offload_layers=1, gradient_checkpointing="reentrant").resolved("cpu")
    # And where the model is prepared, for a config that did not come through resolved().
    config = replace(TrainConfig().resolved("cpu"), offload_layers=1, gradient_checkpointing="reentrant")
    with pytest.raises(ConfigError, match=r"offload_layers.*CUDA"):
        prepare_model(_model(tiny_model_dir), config, "cpu")


def test_all_layers_but_the_last_at_most(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir)  # two layers
    offloaded = offload_first_layers(model, 4)
    _grads(model, _batch(seq=8))
    wrappers = offloaded.wrappers
    assert offloaded.count == 1 and len(wrappers) == 1 and wrappers[0].bytes_offloaded > 0
    assert not isinstance(model.model.layers[1]._gradient_checkpointing_func, OffloadedCheckpoint)
    with pytest.raises(ConfigError, match=r"offload_layers.*>= 1"):
        offload_first_layers(model, 0)


def test_gradients_equal_and_only_the_first_layers_inputs_move(tiny_model_dir: Path) -> None:
    import torch

    batch = _batch(seq=24)
    reference, _ = _grads(_model(tiny_model_dir), batch)
    model = _model(tiny_model_dir)
    wrappers = offload_first_layers(model, 1).wrappers
    grads, loss = _grads(model, batch)
    assert torch.isfinite(loss)
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, reference[name]), name
    # One input of (1, 24, hidden) float32 per forward, of the first layer only.
    hidden = model.config.hidden_size
    assert len(wrappers) == 1 and wrappers[0].bytes_offloaded == 24 * hidden * 4
    layers = model.model.layers
    assert isinstance(layers[0]._gradient_checkpointing_func, OffloadedCheckpoint)
    assert not isinstance(layers[1]._gradient_checkpointing_func, OffloadedCheckpoint)
    # Checkpointing enabled again (as a trainer does): the new function is wrapped at the next forward.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    _grads(model, batch)
    assert isinstance(layers[0]._gradient_checkpointing_func, OffloadedCheckpoint)
    assert wrappers[0].bytes_offloaded == 2 * 24 * hidden * 4


@pytest.mark.gpu
def test_cuda_inputs_leave_the_card_until_the_backward_needs_them(tmp_path: Path) -> None:
    """Measured when the backward reaches the last layer, where the peak of LoRA training falls (every earlier
    layer's input still waits then; the global peak of this full fine-tune is later, once all gradients exist)."""
    import torch

    from tests.support.random_model import save_random_model, tiny_phi3_config

    config = tiny_phi3_config(512, hidden_size=1024, intermediate_size=2048, num_hidden_layers=6,
                              num_attention_heads=8, num_key_value_heads=8)
    save_random_model(tmp_path, config)
    batch = {k: v.cuda() for k, v in _batch(seq=4096, vocab=512).items()}
    live, peaks, grads = [], [], []
    for count in (0, 3):
        model = _model(tmp_path, device="cuda", dtype=torch.bfloat16, attention="eager")
        wrappers = offload_first_layers(model, count).wrappers if count else []
        seen: list[int] = []
        model.model.norm.register_forward_pre_hook(_when_last_layer_backward_starts(
            lambda seen=seen: seen.append(torch.cuda.memory_allocated())))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        got, _ = _grads(model, batch)
        torch.cuda.synchronize()
        live.append(seen[0])
        peaks.append(torch.cuda.max_memory_allocated())
        grads.append({name: grad.cpu() for name, grad in got.items()})  # off the card: not in the next run
        if count:
            assert sum(w.bytes_offloaded for w in wrappers) == 3 * 4096 * 1024 * 2
        del model, got
        torch.cuda.empty_cache()
    moved = 3 * 4096 * 1024 * 2  # three (1, 4096, 1024) bf16 layer inputs: 24 MiB
    assert abs((live[0] - live[1]) - moved) <= 2**20, (live, moved)
    assert peaks[1] <= peaks[0] + 2**20, peaks  # this full fine-tune peaks later, alike (seen: 512 bytes apart)
    for name, grad in grads[1].items():
        torch.testing.assert_close(grad, grads[0][name], rtol=1e-2, atol=1e-3, msg=name)


def _when_last_layer_backward_starts(callback: Any) -> Any:
    """A forward pre-hook for the final norm: its input is the last layer's output, whose gradient arrives just
    before that layer's backward."""
    def hook(_module: Any, args: Any) -> None:
        args[0].register_hook(lambda _grad: callback())

    return hook


def _model(folder: Path, *, device: str = "cpu", dtype: Any = None, attention: str = "sdpa") -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, attn_implementation=attention)
    model = model.to(device).train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model


def _batch(*, seq: int, vocab: int = 300) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, seq), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


def _grads(model: Any, batch: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, loss.detach()
