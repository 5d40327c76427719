"""The LoRA bank's batched product equals the per-row LoRA formula; unsupported adapters are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from persona_router.adapters.engine.lora_bank import LoraBank, slot_bucket
from persona_router.adapters.engine.peft_adapter import AdapterWeights, GroupShape, load_adapter
from persona_router.core.errors import AdapterError, QueueFullError

from tests.unit.test_engine_equivalence import make_adapter

GROUPS = {"qkv": GroupShape((("self_attn.qkv_proj", 12),), 8), "down": GroupShape((("mlp.down_proj", 8),), 10)}
FUSED = {"qkv": GroupShape((("self_attn.q_proj", 8), ("self_attn.k_proj", 4), ("self_attn.v_proj", 4)), 8)}


def _random_adapter(groups: dict[str, GroupShape], rank: int, scaling: float, seed: int) -> AdapterWeights:
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in groups.items():
        parts = len(shape.parts)
        a = torch.randn(parts * rank, shape.in_features, generator=gen)
        b = torch.zeros(sum(n for _, n in shape.parts), parts * rank)
        row = 0
        for p, (_, out) in enumerate(shape.parts):
            b[row:row + out, p * rank:(p + 1) * rank] = torch.randn(out, rank, generator=gen)
            row += out
        tensors[(0, name)] = (a, b)
    return AdapterWeights(folder=Path("."), rank=rank, scaling=scaling, tensors=tensors)


@pytest.mark.parametrize("groups", [GROUPS, FUSED])
def test_batched_lora_equals_per_row_formula(groups: dict[str, GroupShape]) -> None:
    import torch

    bank = LoraBank(groups, num_layers=1, capacity=4, max_rank=8, dtype=torch.float64, device="cpu")
    adapters = {1: _random_adapter(groups, 8, 2.0, 1), 2: _random_adapter(groups, 4, 0.5, 2),
                3: _random_adapter(groups, 2, 3.0, 3)}
    for slot, weights in adapters.items():
        assert bank.install(f"a{slot}", weights) == slot
    slots = torch.tensor([0, 3, 1, 2, 1, 0, 3])
    for name, shape in groups.items():
        x = torch.randn(len(slots), shape.in_features, dtype=torch.float64)
        base = torch.randn(len(slots), sum(n for _, n in shape.parts), dtype=torch.float64)
        out = bank.apply(0, name, x, base.clone(), bank.batch(slots, slot_bucket(3, 4)))
        for row, slot in enumerate(slots.tolist()):
            expected = base[row].clone()
            if slot:
                a, b = (t.double() for t in adapters[slot].tensors[(0, name)])
                expected += (x[row] @ a.T @ b.T) * adapters[slot].scaling
            torch.testing.assert_close(out[row], expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(out[slots == 0], base[slots == 0])  # the bare base is untouched, bit for bit


def test_slot_bucket() -> None:
    assert [slot_bucket(m, 8) for m in (0, 1, 2, 3, 5, 8)] == [0, 1, 2, 4, 8, 8]
    assert slot_bucket(5, 6) == 6


def test_retired_slot_frees_after_last_release() -> None:
    import torch

    bank = LoraBank(GROUPS, num_layers=1, capacity=2, max_rank=8, dtype=torch.float32, device="cpu")
    bank.install("p", _random_adapter(GROUPS, 8, 1.0, 1))
    held = bank.acquire("p")
    bank.install("p", _random_adapter(GROUPS, 8, 1.0, 2))  # replacement takes the other slot
    assert bank.acquire("p") != held
    # Busy, not broken: a QueueFullError (retry), never an AdapterError that would refuse a healthy adapter.
    with pytest.raises(QueueFullError, match="slots") as busy:
        bank.install("q", _random_adapter(GROUPS, 8, 1.0, 3))  # the old slot is still in use
    assert not isinstance(busy.value, AdapterError)
    bank.release(held)
    assert bank.install("q", _random_adapter(GROUPS, 8, 1.0, 3)) == held


# -- reading PEFT folders ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("bank") / "plain", seed=0, r=8, lora_alpha=32,
                        target_modules="all-linear")


def _shapes(tiny_model_dir: Path) -> dict[str, GroupShape]:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    return {"qkv": GroupShape((("self_attn.qkv_proj", hidden + 2 * kv),), hidden),
            "o": GroupShape((("self_attn.o_proj", hidden),), hidden),
            "gate_up": GroupShape((("mlp.gate_up_proj", 2 * inter),), hidden),
            "down": GroupShape((("mlp.down_proj", hidden),), inter)}


def _copy_with(folder: Path, target: Path, **changes: object) -> Path:
    target.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (target / "adapter_config.json").write_text(json.dumps(config))
    (target / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    return target


def test_reads_scaling_and_rslora(tiny_model_dir: Path, plain_adapter: Path, tmp_path: Path) -> None:
    shapes = _shapes(tiny_model_dir)
    plain = load_adapter(plain_adapter, groups=shapes, num_layers=2, max_rank=16)
    assert plain.rank == 8 and plain.scaling == 4.0 and len(plain.tensors) == 8
    rs = load_adapter(_copy_with(plain_adapter, tmp_path / "rs", use_rslora=True), groups=shapes, num_layers=2,
                      max_rank=16)
    assert rs.scaling == pytest.approx(32 / math.sqrt(8))


@pytest.mark.parametrize("change", [{"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"bias": "all"},
                                    {"lora_bias": True}, {"alpha_pattern": {"qkv_proj": 8}},
                                    {"peft_type": "IA3"}, {"init_lora_weights": "pissa"}, {"r": 0}])
def test_unsupported_configs_are_refused(tiny_model_dir: Path, plain_adapter: Path, tmp_path: Path,
                                         change: dict[str, object]) -> None:
    folder = _copy_with(plain_adapter, tmp_path / "bad", **change)
    with pytest.raises(AdapterError) as info:
        load_adapter(folder, groups=_shapes(tiny_model_dir), num_layers=2, max_rank=16)
    assert info.value.field == next(iter(change))


def test_wrong_shapes_rank_and_corrupt_files_are_refused(tiny_model_dir: Path, plain_adapter: Path,
                                                         tmp_path: Path) -> None:
    shapes = _shapes(tiny_model_dir)
    other = {name: GroupShape(s.parts, s.in_features * 2) for name, s in shapes.items()}
    with pytest.raises(AdapterError, match="another base"):
        load_adapter(plain_adapter, groups=other, num_layers=2, max_rank=16)
    with pytest.raises(AdapterError, match="max_rank"):
        load_adapter(plain_adapter, groups=shapes, num_layers=2, max_rank=4)
    with pytest.raises(AdapterError, match="layer"):
        load_adapter(plain_adapter, groups=shapes, num_layers=1, max_rank=16)
    corrupt = _copy_with(plain_adapter, tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="corrupt"):
        load_adapter(corrupt, groups=shapes, num_layers=2, max_rank=16)
    with pytest.raises(AdapterError, match="missing"):
        load_adapter(tmp_path / "nowhere", groups=shapes, num_layers=2, max_rank=16)
