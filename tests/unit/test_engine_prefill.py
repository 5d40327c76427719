"""Prefill of right-padded prompts (what prefill CUDA graphs replay) equals the unpadded prefill.

CPU float32 on the tiny random Phi-3: the last-token logits and every cache entry of the real positions
match the unpadded run to float32 summation-order precision (padding changes only the matrix shapes).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_engine_equivalence import engine_adapters, make_engine, prompts

__all__ = ["engine_adapters"]


def test_padded_prefill_equals_unpadded(tiny_model_dir: Path, engine_adapters: dict[str, Path]) -> None:
    import torch
    from persona_router.adapters.engine.graphs import padded_length

    engine = make_engine(tiny_model_dir, engine_adapters)
    runner = engine.runner
    batch = [list(p) for p in prompts(engine.tokenizer)[:2]]
    slots = [engine.bank.acquire("alpha"), 0]
    rows = [2, 5]
    want = runner.prefill(rows, batch, slots, 1)
    want_k = [runner.k_cache[0][r, :, :len(p)].clone() for r, p in zip(rows, batch, strict=True)]
    length = padded_length(max(len(p) for p in batch))
    assert length > max(len(p) for p in batch)
    got = runner.prefill_forward(runner.prefill_inputs(rows, batch, slots, length), 1)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    for row, prompt, k in zip(rows, batch, want_k, strict=True):
        assert torch.allclose(runner.k_cache[0][row, :, :len(prompt)], k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("longest", "length"), [(1, 16), (16, 16), (17, 32), (128, 128), (129, 256)])
def test_padded_length(longest: int, length: int) -> None:
    from persona_router.adapters.engine.graphs import padded_length

    assert padded_length(longest) == length
