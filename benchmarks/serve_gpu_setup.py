"""The random model, adapters and prompts of ``serve_gpu.py`` and its device helpers (memory, timing, copy
bandwidth, bytes a step reads): kept apart from the measurements so the other GPU benchmarks can build the same
workload without the serving suite.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(folder: Path, smoke: bool) -> float:
    """Save the random model and a word-level tokenizer covering its vocabulary; returns seconds (0 if cached)."""
    import torch
    from transformers import Phi3Config

    from tests.support.random_model import save_random_model, tiny_phi3_config

    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return 0.0
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    config: Any = tiny_phi3_config(512) if smoke else Phi3Config()
    save_random_model(folder, config, seed=0, dtype=torch.float32 if smoke else torch.bfloat16,
                      device=None if smoke else "cuda")
    save_tokenizer(folder, config.vocab_size, config.eos_token_id)
    return time.perf_counter() - started


def save_tokenizer(folder: Path, vocab_size: int, eos_id: int) -> None:
    """Random weights need no real tokenizer, but streaming detokenisation should cost what it costs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    vocab = {f"w{i}": i for i in range(vocab_size) if i != eos_id}
    vocab[eos] = eos_id
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=eos))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos).save_pretrained(folder)


def write_adapters(model: Any, root: Path, count: int, rank: int) -> list[Path]:
    """``count`` random r-rank LoRA adapters on every linear layer of the decoder, in PEFT's file format."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    targets = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    folders = []
    for index in range(count):
        folder = root / f"adapter{index}"
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(100 + index)
        tensors = {}
        for layer_index, layer in enumerate(model.model.layers):
            for path in targets:
                module = layer.get_submodule(path)
                key = f"base_model.model.model.layers.{layer_index}.{path}"
                a = torch.randn(rank, module.in_features, generator=gen) / module.in_features ** 0.5
                tensors[f"{key}.lora_A.weight"] = a.to(torch.bfloat16)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(module.out_features, rank, generator=gen) * 0.02
                                                   ).to(torch.bfloat16)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[p.split(".")[-1] for p in targets],
                   task_type="CAUSAL_LM").save_pretrained(str(folder))
        folders.append(folder)
    return folders


def load_model(folder: Path, precision: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if precision == "nf4":
        from persona_router.adapters.base_model import nf4_config

        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4_config(), dtype=torch.bfloat16,
                                                    device_map={"": 0}).eval()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device()).eval()


def make_prompts(count: int, length: int, vocab: int) -> list[tuple[int, ...]]:
    import torch

    gen = torch.Generator().manual_seed(7)
    return [tuple(torch.randint(10, vocab - 100, (length,), generator=gen).tolist()) for _ in range(count)]


def gpu_memory() -> dict[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return {"allocated_gib": None, "peak_gib": None}
    return {"allocated_gib": torch.cuda.memory_allocated() / 2**30,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def timed(fn: Callable[[], Any], repeats: int = 30, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` between CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> dict[str, float]:
    """Device-to-device copy of 2 GiB, bytes read plus written, over the median time."""
    import torch

    size = 2 << 30
    buffers = [torch.empty(size, dtype=torch.uint8, device="cuda").random_(),
               torch.empty(size, dtype=torch.uint8, device="cuda")]
    ms = timed(lambda: buffers[1].copy_(buffers[0]), repeats=20)
    buffers.clear()
    free_memory()
    return {"bytes_moved": 2 * size, "ms": ms, "tb_s": 2 * size / ms / 1e9}


def weight_bytes(runner: Any) -> int:
    """Bytes the base weights of one step occupy as stored (what a step must read at least once)."""
    total = runner.w.lm_head.numel() * runner.w.lm_head.element_size()
    for layer in runner.w.layers:
        for group in layer.groups.values():
            if group.weight is not None:
                total += group.weight.numel() * group.weight.element_size()
            if group.nf4 is not None:
                total += group.nf4.nbytes
            if group.kmajor is not None:
                total += group.kmajor.nbytes
            for module in group.modules:
                state = module.weight.quant_state
                total += module.weight.numel() * module.weight.element_size()
                total += state.absmax.numel() * state.absmax.element_size()
                if state.state2 is not None:
                    total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


def one_row_bytes(runner: Any) -> int:
    """Bytes a one-row decode step reads at least once: each group through its one-row 4-bit GEMV where it has
    one (the K-major copy, or bitsandbytes' bytes and float32 scales), else as stored (``weight_bytes``)."""
    total = runner.w.lm_head.numel() * runner.w.lm_head.element_size()
    for layer in runner.w.layers:
        for group in layer.groups.values():
            gemv = group.gemv
            if group.kmajor is not None:
                total += group.kmajor.nbytes
            elif gemv is not None and gemv.kmajor is not None:
                total += gemv.kmajor.nbytes
            elif gemv is not None:
                total += gemv.packed.numel() * gemv.packed.element_size() + gemv.absmax.numel() * 4
            elif group.weight is not None:
                total += group.weight.numel() * group.weight.element_size()
            elif group.nf4 is not None:
                total += group.nf4.nbytes
    return total


def free_memory() -> None:
    gc.collect()
    if device() == "cuda":
        import torch

        torch.cuda.empty_cache()


def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
