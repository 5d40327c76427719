"""Two speed switches: compiled decoder layers, and metrics read once per log line instead of per micro-batch.

- ``compile_layers``: the compiled layers must compute what the eager ones compute (loss and LoRA gradients),
  and under gradient checkpointing the recomputed forward must draw the same dropout masks as the forward
  (checked against the same compiled model without checkpointing, with the same seed: a mismatch would change
  the gradients, not crash). On CPU (inductor's C++ backend) with a float32 tiny model; on CUDA with bf16,
  the varlen attention path and the 4-bit base, as training runs there.
- ``deferred_metrics``: the loss is TRL's to the last bit, the logged entropy and accuracy equal TRL's, and the
  training path reads nothing back from the device (``Tensor.item`` is counted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from persona_router.core.errors import ConfigError
from persona_router.training.config import TrainConfig
from persona_router.training.formatting import build_examples

from tests.support.packed_attention import packed_batch, traceable_packed_kernel
from tests.support.tiny_training import RECORDS, SYSTEM

LENGTHS = [5, 17, 1, 9, 30]


@pytest.mark.parametrize("field", ["compile_layers", "deferred_metrics"])
def test_switches_validate_and_resolve_per_device(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: "yes"})  # type: ignore[arg-type]
    assert getattr(TrainConfig().resolved("cuda"), field) in ("on", "off")
    assert getattr(TrainConfig(**{field: "off"}).resolved("cuda"), field) == "off"  # type: ignore[arg-type]
    cpu = TrainConfig().resolved("cpu")
    assert (cpu.compile_layers, cpu.deferred_metrics) == ("off", "off")


# -- deferred metrics ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> Any:
    from persona_router.adapters.base_model import BaseModelConfig, load_base

    return load_base(BaseModelConfig(base=str(tiny_model_dir)), for_training=True)


def _trainer(base: Any, tmp_path: Path, **overrides: Any) -> Any:
    """The trainer CUDA training builds (``build_trainer`` picks the answer-loss trainer on CPU), on the CPU."""
    import datasets
    import trl
    from persona_router.training.lean_trainer import trainer_class
    from persona_router.training.sft_setup import lora_config, sft_config

    config = TrainConfig(batch_size=len(RECORDS), max_length=512, max_steps=1, **overrides).resolved("cpu")
    formatted = build_examples(RECORDS, system_prompt=SYSTEM, tokenizer=base.tokenizer, max_length=512)
    base.model.config.use_cache = False
    return trainer_class(trl, config)(
        model=base.model, args=sft_config(config, output_dir=tmp_path / "work", device="cpu"),
        train_dataset=datasets.Dataset.from_list([e.to_row() for e in formatted.examples]),
        processing_class=base.tokenizer, peft_config=lora_config(config))


class _ItemCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import torch

        self.calls = 0
        original = torch.Tensor.item

        def counting(tensor: Any) -> Any:
            self.calls += 1
            return original(tensor)

        monkeypatch.setattr(torch.Tensor, "item", counting)


def test_deferred_metrics_give_trl_loss_and_metrics_without_device_reads(
        base: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import trl

    trainer = _trainer(base, tmp_path, deferred_metrics="on")
    try:
        assert type(trainer).__name__ == "DeferredMetricsSFTTrainer"
        assert trainer.args.logging_nan_inf_filter is False
        assert str(trainer.args.include_num_input_tokens_seen) == "no"
        model = trainer.model.train()
        batch = next(iter(trainer.get_train_dataloader()))
        assert "position_ids" in batch and "attention_mask" not in batch  # a packed row: the deferred path
        with torch.no_grad():
            expected = trl.SFTTrainer.compute_loss(trainer, model, dict(batch))
            trainer.log({"loss": 0.0})
            trl_logged = trainer.state.log_history[-1]
            tokens_before = trainer._total_train_tokens
            counter = _ItemCounter(monkeypatch)
            got = trainer.compute_loss(model, dict(batch))
            assert counter.calls == 0, "the training path read a value back from the device"
            trainer.log({"loss": 0.0})
        assert torch.equal(got, expected)
        assert trainer._total_train_tokens - tokens_before == int(batch["input_ids"].numel())
        ours = trainer.state.log_history[-1]
        for key in ("entropy", "mean_token_accuracy"):
            assert ours[key] == pytest.approx(trl_logged[key], rel=1e-5), key
        # Evaluation (and anything else the deferred path does not cover) goes through TRL unchanged.
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(trainer.compute_loss(model, dict(batch)),
                                       trl.SFTTrainer.compute_loss(trainer, model, dict(batch)))
    finally:
        trainer.model.unload()


def test_deferred_metrics_off_is_trl_itself(base: Any, tmp_path: Path) -> None:
    import trl

    trainer = _trainer(base, tmp_path, deferred_metrics="off")
    try:
        assert type(trainer) is trl.SFTTrainer
        assert trainer.args.logging_nan_inf_filter is True
    finally:
        trainer.model.unload()


# -- compiled decoder layers ------------------------------------------------------------------------------------------

def _lora_model(folder: Path, device: str, dtype: Any, dropout: float, *, four_bit: bool = False) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if four_bit:
        from persona_router.adapters.base_model import nf4_config

        kwargs.update(quantization_config=nf4_config(double_quant=True), device_map={"": device})
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if not four_bit:
        model = model.to(device)
    model.config.use_cache = False
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; random values make every gradient informative
            torch.nn.init.normal_(param, std=0.05)
    return model


def _loss_and_grads(model: Any, batch: dict[str, Any], *, checkpointing: bool, seed: int, dtype: Any,
                    reentrant: bool = False) -> Any:
    import torch

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    else:
        model.gradient_checkpointing_disable()
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    device = batch["input_ids"].device.type
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(**batch, labels=batch["input_ids"], use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads, "no LoRA gradients"
    return loss.detach().float(), grads


def _rel(a: Any, b: Any) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _rel_all(got: dict[str, Any], want: dict[str, Any]) -> float:
    """Relative distance of two sets of gradients taken as one vector."""
    import torch

    diff = torch.stack([(got[name] - want[name]).norm() for name in want]).norm()
    return float(diff / torch.stack([want[name].norm() for name in want]).norm().clamp(min=1e-12))


def _compiled_matches_eager(folder: Path, device: str, dtype: Any, *, attention: str, four_bit: bool,
                            tolerance: float, reentrant: bool) -> None:
    import torch
    from persona_router.training.cuda_kernels import prepare_model
    from transformers import AutoConfig

    config = TrainConfig(attention=attention, compile_layers="on", liger_kernels="off",
                         offload_layers=0).resolved(device)
    batch = packed_batch(LENGTHS, AutoConfig.from_pretrained(folder).vocab_size, device=device)
    # Eager reference, no dropout.
    eager = _lora_model(folder, device, dtype, 0.0, four_bit=four_bit)
    eager_config = TrainConfig(attention=attention, liger_kernels="off", compile_layers="off", offload_layers=0)
    prepare_model(eager.get_base_model(), eager_config.resolved(device), device)
    want_loss, want = _loss_and_grads(eager, batch, checkpointing=True, seed=0, dtype=dtype, reentrant=reentrant)
    compiled = _lora_model(folder, device, dtype, 0.0, four_bit=four_bit)
    assert "compile_layers" in prepare_model(compiled.get_base_model(), config, device)
    got_loss, got = _loss_and_grads(compiled, batch, checkpointing=True, seed=0, dtype=dtype, reentrant=reentrant)
    assert _rel(got_loss, want_loss) < tolerance
    assert got.keys() == want.keys()
    for name in want:
        assert _rel(got[name], want[name]) < tolerance, name
    # Dropout: the recomputation under checkpointing must reproduce the forward's masks (reentrant: the training
    # graph of the recomputation must draw what the gradient-free forward graph drew).
    torch._dynamo.reset()
    dropped = _lora_model(folder, device, dtype, 0.3, four_bit=four_bit)
    prepare_model(dropped.get_base_model(), config, device)
    plain_loss, plain = _loss_and_grads(dropped, batch, checkpointing=False, seed=5, dtype=dtype)
    ckpt_loss, ckpt = _loss_and_grads(dropped, batch, checkpointing=True, seed=5, dtype=dtype, reentrant=reentrant)
    other_loss, other = _loss_and_grads(dropped, batch, checkpointing=True, seed=6, dtype=dtype, reentrant=reentrant)
    assert not torch.equal(other_loss, ckpt_loss)  # control: dropout is active, so another seed differs
    if reentrant and dtype != torch.float32:
        # The reentrant forward runs the gradient-free graph, whose fusions round bf16 differently from the
        # training graph's (seen on an H200: losses 6.0081 vs 6.0083). Same masks: equal up to that rounding,
        # far closer than another seed's masks are.
        assert _rel(ckpt_loss, plain_loss) < 1e-3
        same, another = _rel_all(ckpt, plain), _rel_all(other, plain)
        assert same < 0.1 * another, (same, another)
    else:
        assert torch.equal(plain_loss, ckpt_loss)
        for name in plain:
            assert _rel(ckpt[name], plain[name]) < 1e-5, name
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_compiled_layers_match_eager_on_cpu(tiny_model_dir: Path, reentrant: bool) -> None:
    import torch

    _compiled_matches_eager(tiny_model_dir, "cpu", torch.float32, attention="sdpa", four_bit=False,
                            tolerance=1e-4, reentrant=reentrant)


@pytest.mark.gpu
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_compiled_layers_match_eager_on_cuda_4bit_varlen(tiny_model_dir: Path, reentrant: bool) -> None:
    import torch

    _compiled_matches_eager(tiny_model_dir, "cuda", torch.bfloat16, attention="varlen", four_bit=True,
                            tolerance=3e-2, reentrant=reentrant)


# Packed batches whose total length, example count and longest example all change from one to the next.
CHANGING_BATCHES = [[5, 17, 1, 9, 30], [12, 40, 3], [7, 7, 20, 2, 11, 6], [33, 14]]


def _varlen_with(model: Any, kernel: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from persona_router.training import cuda_kernels

    monkeypatch.setattr(cuda_kernels, "packed_kernel_for", lambda query: kernel)
    model.set_attn_implementation(cuda_kernels.register_varlen_attention())


def _compiles_once(folder: Path, device: str, dtype: Any, monkeypatch: pytest.MonkeyPatch, *, kernel: Any,
                   four_bit: bool, reentrant: bool, tolerance: float) -> None:
    """Every packed batch runs compiled code built in the first one, and each batch's loss and LoRA gradients
    equal the eager layers' on the same batch."""
    import torch
    from persona_router.training.regional_compile import compile_decoder_layers
    from torch._dynamo.utils import counters
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(folder).vocab_size
    eager = _lora_model(folder, device, dtype, 0.0, four_bit=four_bit)
    _varlen_with(eager.get_base_model(), kernel, monkeypatch)
    compiled = _lora_model(folder, device, dtype, 0.0, four_bit=four_bit)
    _varlen_with(compiled.get_base_model(), kernel, monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    compile_decoder_layers(compiled.get_base_model(), max_length=64)
    graphs = []
    for index, lengths in enumerate(CHANGING_BATCHES):
        batch = packed_batch(lengths, vocab, device=device, seed=index)
        want_loss, want = _loss_and_grads(eager, batch, checkpointing=True, seed=0, dtype=dtype, reentrant=reentrant)
        got_loss, got = _loss_and_grads(compiled, batch, checkpointing=True, seed=0, dtype=dtype,
                                        reentrant=reentrant)
        assert _rel(got_loss, want_loss) < tolerance, lengths
        for name in want:
            assert _rel(got[name], want[name]) < tolerance, (lengths, name)
        graphs.append(int(counters["stats"]["unique_graphs"]))
    assert graphs[0] >= 1 and graphs == graphs[:1] * len(CHANGING_BATCHES), graphs  # nothing compiled after batch 1
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_compiled_layers_compile_once_for_changing_packed_batches(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, reentrant: bool) -> None:
    import torch

    _compiles_once(tiny_model_dir, "cpu", torch.float32, monkeypatch, kernel=traceable_packed_kernel,
                   four_bit=False, reentrant=reentrant, tolerance=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_compiled_layers_compile_once_on_cuda_4bit_varlen(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, reentrant: bool) -> None:
    import torch
    from persona_router.training.cuda_kernels import _torch_varlen

    kernel = _torch_varlen()
    assert kernel is not None, "this torch has no varlen attention"
    _compiles_once(tiny_model_dir, "cuda", torch.bfloat16, monkeypatch, kernel=kernel, four_bit=True,
                   reentrant=reentrant, tolerance=3e-2)


@pytest.mark.gpu
def test_flash_varlen_takes_an_upper_bound_for_the_longest_example() -> None:
    """The compiled layers hand FlashAttention max_length instead of the batch's longest example."""
    import torch
    from persona_router.training.cuda_kernels import _torch_varlen

    kernel = _torch_varlen()
    assert kernel is not None
    lengths = [5, 17, 1, 9, 30]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lengths), 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(sum(lengths), 4, 64, device="cuda", dtype=torch.bfloat16)
    results = []
    for bound in (max(lengths), 1024):
        out = kernel(q, k, v, cu, bound, 64 ** -0.5, -1)
        results.append((out.detach().float(), *(g.float() for g in torch.autograd.grad(out, (q, k, v), grad))))
    for exact, bounded in zip(*results, strict=True):
        torch.testing.assert_close(bounded, exact, rtol=0, atol=0)
