"""Training speed settings: config resolution, CPU refusals, and attention over packed rows.

On CPU, ``varlen`` (the CPU default) runs one causal SDPA call per packed example: its logits and gradients
must equal those of transformers' dense block-diagonal mask (float32, 1e-5). Also on CPU, the CUDA kernel's
plumbing (registration, the example boundaries reaching the attention function, the (B, H, S, D) <->
(T, H, D) reshapes, grouped-query heads, the SDPA fallback) is checked with a reference kernel that runs one
SDPA call per example: a packed batch must give the logits that transformers' dense block-diagonal mask gives
(float32, 1e-5). The same comparison with PyTorch's FlashAttention varlen kernel and with Liger's kernels runs
on CUDA only (bf16: relative error <= 2e-2, where bf16 operands give 1e-3..1e-2 per product and two layers
compound it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from persona_router.core.errors import ConfigError
from persona_router.training import cuda_kernels
from persona_router.training.config import TrainConfig
from persona_router.training.cuda_kernels import VARLEN_ATTENTION, prepare_model, register_varlen_attention

from tests.support.packed_attention import packed_batch, reference_packed_kernel

LENGTHS = [5, 17, 1, 9, 30]


def _load(folder: Path, *, device: str = "cpu", dtype: Any = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, attn_implementation="sdpa")
    return model.to(device).eval()


def _logits(model: Any, batch: dict[str, Any], attention: str) -> Any:
    import torch

    model.set_attn_implementation(attention)
    with torch.no_grad():
        return model(**batch, use_cache=False).logits.float()


def test_defaults_resolve_per_device() -> None:
    cuda = TrainConfig().resolved("cuda")
    assert cuda.attention in ("sdpa", "varlen")
    assert cuda.liger_kernels in ("on", "off") and cuda.activation_offloading in ("on", "off")
    cpu = TrainConfig().resolved("cpu")
    assert (cpu.attention, cpu.liger_kernels, cpu.activation_offloading) == ("varlen", "auto", "auto")
    assert TrainConfig(packing=False).resolved("cpu").attention == "sdpa"
    # varlen is for packed rows: unpacked training keeps SDPA unless varlen is asked for explicitly
    assert TrainConfig(packing=False).resolved("cuda").attention == "sdpa"
    assert TrainConfig(attention="sdpa").resolved("cuda").attention == "sdpa"


@pytest.mark.parametrize(("field", "value"), [("attention", "flash"), ("liger_kernels", "yes"),
                                               ("activation_offloading", "maybe")])
def test_invalid_speed_settings_name_the_field(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_cuda_only_settings_are_refused_on_cpu(tmp_path: Path) -> None:
    from persona_router.training.sft_setup import sft_config

    with pytest.raises(ConfigError, match="liger_kernels"):
        prepare_model(object(), TrainConfig(liger_kernels="on").resolved("cpu"), "cpu")
    with pytest.raises(ConfigError, match="activation_offloading"):
        sft_config(TrainConfig(activation_offloading="on").resolved("cpu"), output_dir=tmp_path, device="cpu")
    with pytest.raises(ConfigError, match="packing"):
        prepare_model(object(), TrainConfig(attention="varlen", packing=False).resolved("cuda"), "cuda")


def test_cpu_defaults_select_per_example_attention_and_sdpa_stays_sdpa(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir)
    applied = prepare_model(model, TrainConfig().resolved("cpu"), "cpu")
    assert "per packed example" in applied["attention"]
    assert model.config._attn_implementation == VARLEN_ATTENTION
    assert prepare_model(model, TrainConfig(attention="sdpa").resolved("cpu"), "cpu") == {"attention": "sdpa"}
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("trailing_pad", [0, 3])
def test_cpu_per_example_attention_matches_the_block_diagonal_mask_with_gradients(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, trailing_pad: int) -> None:
    import torch

    model = _load(tiny_model_dir)  # grouped-query heads: SDPA's enable_gqa serves them
    batch = packed_batch(LENGTHS, model.config.vocab_size)
    if trailing_pad:  # a collator padding to a multiple: positions 0 after the boundaries TRL computed
        batch["input_ids"] = torch.cat([batch["input_ids"], torch.zeros(1, trailing_pad, dtype=torch.long)], 1)
        batch["position_ids"] = torch.cat([batch["position_ids"], torch.zeros(1, trailing_pad, dtype=torch.long)], 1)
    calls: list[int] = []
    real = cuda_kernels.per_example_sdpa

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(cuda_kernels, "per_example_sdpa", counting)

    def logits_and_grads(attention: str) -> tuple[Any, list[Any]]:
        model.zero_grad()
        model.set_attn_implementation(attention)
        logits = model(**batch, use_cache=False).logits
        logits[0, : sum(LENGTHS)].float().square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    expected, expected_grads = logits_and_grads("sdpa")
    got, got_grads = logits_and_grads(register_varlen_attention())
    assert len(calls) == model.config.num_hidden_layers
    real_tokens = slice(0, sum(LENGTHS))  # padding tokens attend differently (to themselves) and carry no labels
    torch.testing.assert_close(got[0, real_tokens], expected[0, real_tokens], rtol=1e-5, atol=1e-5)
    assert len(got_grads) == len(expected_grads) > 0
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_cpu_examples_longer_than_a_sliding_window_take_the_masked_path() -> None:
    assert cuda_kernels._fits_window(512, None) and cuda_kernels._fits_window(512, 512)
    assert not cuda_kernels._fits_window(513, 512)


def test_packed_rows_through_the_varlen_path_match_the_block_diagonal_mask(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    model = _load(tiny_model_dir)  # 4 query heads over 2 key/value heads: the grouped-query reshape is exercised
    batch = packed_batch(LENGTHS, model.config.vocab_size)
    expected = _logits(model, batch, "sdpa")  # transformers builds the block-diagonal mask from position_ids

    calls: list[int] = []

    def counting_kernel(*args: Any) -> Any:
        calls.append(1)
        return reference_packed_kernel(*args)

    monkeypatch.setattr(cuda_kernels, "packed_kernel_for", lambda query: counting_kernel)
    name = register_varlen_attention()
    assert name == VARLEN_ATTENTION
    got = _logits(model, batch, name)
    assert len(calls) == model.config.num_hidden_layers  # the boundaries reached every layer's attention
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # Control: the same rows without restarting positions attend across examples and must differ.
    crossing = {k: v for k, v in batch.items() if not k.startswith(("cu_seq", "max_length"))}
    crossing["position_ids"] = torch.arange(sum(LENGTHS))[None]
    assert not torch.allclose(_logits(model, crossing, "sdpa"), expected, atol=1e-3)


def test_batches_without_boundaries_fall_back_to_sdpa(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    model = _load(tiny_model_dir)

    def never(*args: Any) -> Any:
        raise AssertionError("the packed kernel must not run without example boundaries")

    monkeypatch.setattr(cuda_kernels, "packed_kernel_for", lambda query: never)
    register_varlen_attention()
    padded = {"input_ids": torch.randint(3, model.config.vocab_size, (2, 12)),
              "attention_mask": torch.tensor([[1] * 12, [0] * 4 + [1] * 8])}
    torch.testing.assert_close(_logits(model, padded, VARLEN_ATTENTION), _logits(model, padded, "sdpa"))
    packed = {k: v for k, v in packed_batch(LENGTHS, model.config.vocab_size).items()
              if not k.startswith(("cu_seq", "max_length"))}  # position_ids only: the mask keeps examples apart
    torch.testing.assert_close(_logits(model, packed, VARLEN_ATTENTION), _logits(model, packed, "sdpa"))


def _rel(a: Any, b: Any) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.gpu
def test_cuda_varlen_kernel_matches_reference_forward_and_backward() -> None:
    import torch

    kernel = cuda_kernels.packed_kernel_for(torch.empty(1, device="cuda", dtype=torch.bfloat16))
    assert kernel is not None, "torch.nn.attention.varlen is missing"
    lengths = [1, 37, 256, 700, 3, 1024]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    heads, dim = 8, 96
    q, k, v = (torch.randn(sum(lengths), heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(sum(lengths), heads, dim, device="cuda", dtype=torch.bfloat16)
    out = kernel(q, k, v, cu, max(lengths), dim ** -0.5, -1)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_packed_kernel(q64, k64, v64, cu, max(lengths), dim ** -0.5, -1)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    assert _rel(out.double(), ref) < 1e-2
    for got, want in zip(grads, ref_grads, strict=True):
        assert _rel(got.double(), want) < 2e-2


@pytest.mark.gpu
def test_cuda_model_logits_varlen_and_liger_match_sdpa(tiny_model_dir: Path) -> None:
    import torch

    model = _load(tiny_model_dir, device="cuda", dtype=torch.bfloat16)
    batch = packed_batch(LENGTHS, model.config.vocab_size, device="cuda")
    expected = _logits(model, batch, "sdpa")
    varlen = _logits(model, batch, register_varlen_attention())
    assert _rel(varlen, expected) < 2e-2
    config = TrainConfig(attention="varlen", liger_kernels="on", compile_layers="off").resolved("cuda")
    applied = prepare_model(model, config, "cuda")
    assert "liger_kernels" in applied
    assert _rel(_logits(model, batch, VARLEN_ATTENTION), expected) < 2e-2
    # Liger patched this instance only: a model built afterwards keeps transformers' own modules
    fresh = _load(tiny_model_dir, device="cuda", dtype=torch.bfloat16)
    assert type(fresh.model.norm).__name__ == "Phi3RMSNorm"
    assert fresh.model.layers[0].mlp.forward.__func__ is type(fresh.model.layers[0].mlp).forward
