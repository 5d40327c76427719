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


def test_prefill_graphs_run_eagerly_past_their_token_bound() -> None:
    """``EngineConfig.prefill_graph_tokens`` bounds what ``PrefillGraphs`` captures: a prefill of more padded
    tokens (prompts x length) goes to the runner's eager prefill, unchanged; the config refuses negative bounds."""
    from persona_router.adapters.engine.config import EngineConfig
    from persona_router.adapters.engine.graphs import PrefillGraphs
    from persona_router.core.errors import ConfigError

    class EagerOnly:
        cache_len = 256

        def __init__(self) -> None:
            self.calls: list[tuple[list[int], int]] = []

        def prefill(self, rows: list[int], prompts: list[list[int]], slots: list[int], m: int) -> str:
            self.calls.append((rows, m))
            return "eager"

        def prefill_inputs(self, *args: object) -> None:
            raise AssertionError("a prefill past the bound must not be prepared for a graph")

    runner = EagerOnly()
    graphs = PrefillGraphs(runner, pool=None, max_tokens=EngineConfig(prefill_graph_tokens=64).prefill_graph_tokens)
    assert graphs([0, 1, 2], [[1] * 20, [2] * 3, [3] * 5], [0, 0, 0], 0) == "eager"  # 3 prompts x 32 > 64
    assert runner.calls == [([0, 1, 2], 0)] and graphs.captures == 0
    assert EngineConfig().prefill_graph_tokens == 4096
    with pytest.raises(ConfigError, match="between 0 and") as info:
        EngineConfig(prefill_graph_tokens=-1)
    assert info.value.field == "prefill_graph_tokens"
