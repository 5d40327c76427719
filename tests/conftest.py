"""Shared fixtures: a tiny random Phi-3 with its own tokenizer, thread limits, an isolated cache home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two busy torch pools on two cores collapse throughput; tests and servers share the machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer random Phi-3 with a ChatML tokenizer, saved as a normal model folder."""
    import torch

    from tests.support.random_model import build_tiny_model

    torch.set_num_threads(2)
    return build_tiny_model(tmp_path_factory.mktemp("tiny-phi3"))


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point PERSONA_ROUTER_HOME at an empty folder for this test."""
    home = tmp_path / "home"
    monkeypatch.setenv("PERSONA_ROUTER_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent (it sits beside the checkout in CI)")
    return SHARED_DATA
