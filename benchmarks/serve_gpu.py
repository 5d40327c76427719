"""Serving benchmark on one GPU: vanilla PEFT ``generate(adapter_names=...)`` against ``BatchedEngine``.

Model: a randomly initialised Phi-3-mini-shaped model (``Phi3Config()`` defaults, 3.82B parameters),
saved once to local disk; speed and memory depend on the shape, not the values. Workload: random
128-token prompts, 64 new tokens, greedy, no early stop; random r=16 all-linear LoRA adapters.
For each precision (NF4 and bf16): batch-1 ms/token and time to first token, throughput at 8/32/64
concurrent streams over 1 and over 4 adapters, adapter load time, peak GPU memory; for NF4 also the
engine's ``kernel`` mode (4-bit matmuls) against its default ``dequantize`` mode.

    python3 benchmarks/serve_gpu.py --out benchmarks/results/serve_gpu.json     # on the GPU machine
    python benchmarks/serve_gpu.py --smoke --out /tmp/serve_smoke.json         # CPU check of this script

The JSON is rewritten after every phase, so a run cut short still leaves its numbers. Exit status 1 when
a self-check fails (engine vs PEFT logits, or a stream that did not deliver all its tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after the installed package: the repo root holds a bare persona_router folder

log = logging.getLogger("serve_gpu")
TARGETS = {"batch1_speedup": 6.0, "mixed8_speedup": 5.0, "mixed_vs_single_32": 0.8}
# The self-check compares engine and vanilla PEFT with a float32 reference of the same function (for NF4: the
# dequantised 4-bit weights in float32). Both run in bf16, so both drift; the engine fails the check only
# when its drift is clearly larger than PEFT's: above DRIFT_FACTOR times PEFT's plus DRIFT_SLACK.
DRIFT_FACTOR = 1.5
DRIFT_SLACK = 5e-3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results path")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/persona-router-bench/phi3-mini-random"))
    parser.add_argument("--precisions", default="nf4,bf16")
    parser.add_argument("--streams", default="8,32,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--engine-only", action="store_true",
                        help="skip vanilla PEFT's throughput suite and the engine's bitsandbytes-kernel mode (the "
                             "self-check still compares with vanilla PEFT's logits)")
    parser.add_argument("--engine-config", default="",
                        help="EngineConfig fields for the engine under test, e.g. nf4_mode=fused,kernels=on "
                             "(default: the engine's own defaults)")
    parser.add_argument("--variants", default="",
                        help="';'-separated further engine configurations measured after the first one in the same "
                             "process on the same model (self-check, streams, memory), e.g. 'kernels=off;"
                             "nf4:gemv=triton' (a 'precision:' prefix limits one to that precision)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, not speed")
    return parser.parse_args()


def engine_overrides(text: str) -> dict[str, str]:
    """``key=value,key=value`` as EngineConfig keyword arguments (string fields only)."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--engine-config wants key=value pairs, got {text!r}")
    return {key.strip(): value.strip() for key, value in pairs}


# -- setup ------------------------------------------------------------------------------------------


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


# -- vanilla PEFT -----------------------------------------------------------------------------------


def vanilla_generate(peft_model: Any, prompts: list[tuple[int, ...]], names: list[str], new_tokens: int) -> float:
    import torch

    ids = torch.tensor(prompts, device=device())
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, adapter_names=names,
                                  pad_token_id=0)
    sync()
    elapsed = time.perf_counter() - started
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"vanilla generate made {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")
    return elapsed


def vanilla_suite(peft_model: Any, prompts: list[tuple[int, ...]], names: list[str], args: argparse.Namespace,
                  streams: list[int]) -> dict[str, Any]:
    new = args.new_tokens
    vanilla_generate(peft_model, prompts[:1], names[:1], 4)  # warm-up: kernels, cuBLAS handles
    first = vanilla_generate(peft_model, prompts[:1], names[:1], 1)
    total = vanilla_generate(peft_model, prompts[:1], names[:1], new)
    result: dict[str, Any] = {"batch1": {"ttft_ms": first * 1e3, "ms_per_token": total * 1e3 / new,
                                         "decode_ms_per_token": (total - first) * 1e3 / (new - 1)},
                              "streams": {}}
    for count in streams:
        for adapters in (1, len(names)):
            rows = [names[i % adapters] for i in range(count)]
            try:
                elapsed = vanilla_generate(peft_model, prompts[:count], rows, new)
            except RuntimeError as exc:  # e.g. out of memory at the largest batch: keep the other cases
                log.exception("vanilla %d streams over %d adapters failed", count, adapters)
                result["streams"][f"{count}x{adapters}"] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            result["streams"][f"{count}x{adapters}"] = {"tok_s": count * new / elapsed, "wall_s": elapsed}
            log.info("vanilla %d streams over %d adapters: %.1f tok/s", count, adapters, count * new / elapsed)
    return result


# -- engine -----------------------------------------------------------------------------------------


async def engine_streams(engine: Any, prompts: list[tuple[int, ...]], adapters: list[str | None],
                         new_tokens: int) -> dict[str, Any]:
    from persona_router.adapters.engine_api import GenerationRequest
    from persona_router.adapters.generation import SamplingConfig

    async def consume(handle: Any) -> tuple[float, float, int, str | None]:
        first, count, reason = 0.0, 0, None
        async for event in handle:
            if event.token_id is not None:
                count += 1
                if count == 1:
                    first = time.perf_counter()
            reason = event.finish_reason
        return first, time.perf_counter(), count, reason

    started = time.perf_counter()
    handles = [engine.submit(GenerationRequest(f"r{i}", prompt, adapter, SamplingConfig(max_new_tokens=new_tokens)))
               for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True))]
    done = await asyncio.gather(*(consume(h) for h in handles))
    wall = max(end for _, end, _, _ in done) - started
    ttft = sorted((first - started) * 1e3 for first, _, _, _ in done)
    tokens = sum(count for _, _, count, _ in done)
    complete = all(count == new_tokens and reason == "length" for _, _, count, reason in done)
    decode = [(end - first) * 1e3 / (count - 1) for first, end, count, _ in done if count > 1]
    return {"tok_s": tokens / wall, "wall_s": wall, "ttft_ms_p50": statistics.median(ttft), "ttft_ms_max": ttft[-1],
            "decode_ms_per_token": statistics.median(decode) if decode else None,
            "ms_per_token": wall * 1e3 / new_tokens, "complete": complete}


async def engine_suite(engine: Any, prompts: list[tuple[int, ...]], names: list[str], args: argparse.Namespace,
                       streams: list[int], *, single_adapter_too: bool = True) -> dict[str, Any]:
    engine.start(asyncio.get_running_loop())
    try:
        cases = [(1, 1)] + [(count, k) for count in streams
                            for k in ((1, len(names)) if single_adapter_too else (len(names),))]
        result: dict[str, Any] = {"streams": {}}
        for count, k in cases:
            adapters: list[str | None] = [names[i % k] for i in range(count)]
            await engine_streams(engine, prompts[:count], adapters, args.new_tokens)  # warm-up: graph captures
            measured = await engine_streams(engine, prompts[:count], adapters, args.new_tokens)
            if (count, k) == (1, 1):
                result["batch1"] = measured
            else:
                result["streams"][f"{count}x{k}"] = measured
            log.info("engine %d streams over %d adapters: %.1f tok/s", count, k, measured["tok_s"])
        result["graphs"] = ({"captures": engine.graphs.captures, "disabled": engine.graphs.disabled}
                            if engine.graphs is not None else None)
        return result
    finally:
        engine.stop()


def reference_logits(bench: Bench, precision: str, prompt: tuple[int, ...]) -> dict[str, Any]:
    """Float32 last-token logits (true float32, TF32 off) of the base and adapter ``names[0]``, through PEFT,
    with the weights the benchmarked model holds (for NF4 its 4-bit weights dequantised to float32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref: Any = AutoModelForCausalLM.from_pretrained(bench.args.model_dir, dtype=torch.float32).to(device()).eval()
    if precision == "nf4":
        import bitsandbytes.functional as bnbf

        quantized = dict(bench.model.named_modules())
        for name, module in ref.named_modules():
            source = quantized.get(name)
            state = getattr(getattr(source, "weight", None), "quant_state", None)
            if state is not None:
                module.weight.data = bnbf.dequantize_4bit(source.weight.data, state).float()
    peft_ref = PeftModel.from_pretrained(ref, str(bench.adapters[0]), adapter_name=bench.names[0]).eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            ids = torch.tensor([prompt], device=device())
            out = {name: peft_ref(input_ids=ids, adapter_names=[name or "__base__"]).logits[0, -1].float()
                   for name in (None, bench.names[0])}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    del peft_ref, ref
    free_memory()
    return out


def logits_self_check(engine: Any, peft_model: Any, prompt: tuple[int, ...], reference: dict[str, Any]
                      ) -> dict[str, dict[str, float]]:
    """Last-token prefill logits of engine and vanilla PEFT against the float32 reference: relative L2 errors."""
    import torch
    from persona_router.adapters.engine.lora_bank import slot_bucket

    errors = {}
    for name, ref in reference.items():
        slot = engine.bank.acquire(name)
        try:
            # Through the engine's prefill path (a CUDA graph when it captures one), as requests take it.
            prefill = engine.prefill_graphs or engine.runner.prefill
            got = prefill([0], [list(prompt)], [slot], slot_bucket(slot, engine.bank.capacity))[0].clone()
        finally:
            engine.bank.release(slot)
        with torch.inference_mode():
            ids = torch.tensor([prompt], device=device())
            vanilla = peft_model(input_ids=ids, adapter_names=[name or "__base__"]).logits[0, -1].float()
        errors[name or "base"] = {"engine": float((got - ref).norm() / ref.norm()),
                                  "peft": float((vanilla - ref).norm() / ref.norm()),
                                  "engine_vs_peft": float((got - vanilla).norm() / vanilla.norm())}
    return errors


def time_adapter_loads(engine: Any, peft_model: Any, folder: Path, repeats: int = 3) -> dict[str, float]:
    engine_times, peft_times = [], []
    for i in range(repeats):
        started = time.perf_counter()
        engine.add_adapter(f"load{i}", folder)
        sync()
        engine_times.append(time.perf_counter() - started)
        engine.remove_adapter(f"load{i}")
        started = time.perf_counter()
        peft_model.load_adapter(str(folder), adapter_name=f"load{i}")
        sync()
        peft_times.append(time.perf_counter() - started)
        peft_model.delete_adapter(f"load{i}")
    return {"engine_ms": statistics.median(engine_times) * 1e3, "peft_ms": statistics.median(peft_times) * 1e3}


# -- one precision ----------------------------------------------------------------------------------


@dataclass
class Bench:
    """What one precision's measurements share."""

    args: argparse.Namespace
    precision: str
    section: dict[str, Any]
    save: Any
    model: Any
    tokenizer: Any
    prompts: list[tuple[int, ...]]
    names: list[str]
    adapters: list[Path]
    streams: list[int]

    def engine(self, mode: str, config_text: str | None = None) -> Any:
        """An engine in ``mode`` with ``config_text``'s EngineConfig fields (default: ``--engine-config``)."""
        from persona_router.adapters.engine import BatchedEngine, EngineConfig

        started = time.perf_counter()
        max_len = -(-(self.args.prompt_len + self.args.new_tokens) // 256) * 256
        overrides = engine_overrides(self.args.engine_config if config_text is None else config_text)
        if mode != "auto":
            overrides["nf4_mode"] = mode
        config = EngineConfig(max_batch=max(self.streams), max_len=max_len, max_adapters=8, max_rank=16,
                              stop_token_ids=(), **overrides)
        engine = BatchedEngine(self.model, self.tokenizer, config)
        for name, folder in zip(self.names, self.adapters, strict=True):
            engine.add_adapter(name, folder)
        self.section.setdefault("engine_init_s", {})[config_text or mode] = time.perf_counter() - started
        return engine


def run_precision(precision: str, args: argparse.Namespace, adapters: list[Path], streams: list[int],
                  report: dict[str, Any], save: Any) -> None:
    from transformers import AutoTokenizer

    section: dict[str, Any] = {}
    report["results"][precision] = section
    started = time.perf_counter()
    model = load_model(args.model_dir, precision)
    section["load_s"] = time.perf_counter() - started
    section["memory_base"] = gpu_memory()
    bench = Bench(args=args, precision=precision, section=section, save=save, model=model,
                  tokenizer=AutoTokenizer.from_pretrained(args.model_dir),
                  prompts=make_prompts(max(streams), args.prompt_len, model.config.vocab_size),
                  names=[f"a{i}" for i in range(len(adapters))], adapters=adapters, streams=streams)
    peft_model = compare_with_vanilla(bench)  # the engine of this phase is freed when it returns
    free_memory()
    if precision == "nf4" and not args.engine_only:
        reset_peak()
        phase(section, "engine_kernel", lambda: kernel_mode(bench), save)
        free_memory()
    if "vanilla" in section:
        phase(section, "ratios", lambda: ratios(section), save)
    del peft_model  # with ``bench`` and ``model`` it goes when this returns; the caller collects


def compare_with_vanilla(bench: Bench) -> Any:
    """Engine in its default mode against vanilla PEFT on the same model; returns the PEFT model."""
    from peft import PeftModel

    section, save, names, adapters, prompts = bench.section, bench.save, bench.names, bench.adapters, bench.prompts
    reset_peak()
    engine = bench.engine("auto")  # built before PEFT wraps the model's layers (it also unwraps them itself)
    section["memory_engine_built"] = gpu_memory()
    section["engine_modes"] = {"nf4_mode": engine.nf4_mode, "kernels": engine.runner.kernels,
                               "weight_bytes": weight_bytes(engine.runner),
                               "engine_config": engine_overrides(bench.args.engine_config)}
    reference = reference_logits(bench, bench.precision, prompts[0])  # before PEFT wraps the model
    peft_model = PeftModel.from_pretrained(bench.model, str(adapters[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(str(folder), adapter_name=name)
    peft_model.eval()
    phase(section, "self_check_rel_err", lambda: logits_self_check(engine, peft_model, prompts[0], reference), save)
    phase(section, "adapter_load", lambda: time_adapter_loads(engine, peft_model, adapters[0]), save)
    reset_peak()
    if not bench.args.engine_only:
        phase(section, "vanilla", lambda: {**vanilla_suite(peft_model, prompts, names, bench.args, bench.streams),
                                           "memory": gpu_memory()}, save)
    reset_peak()
    phase(section, "engine", lambda: {**asyncio.run(engine_suite(engine, prompts, names, bench.args, bench.streams)),
                                      "memory": gpu_memory(), "kv_cache_gib": engine.runner.kv_bytes() / 2**30},
          save)
    engine.stop()
    engine = None  # its cache and weights go before the next configuration's are built
    for item in (v.strip() for v in bench.args.variants.split(";")):
        only, _, text = item.rpartition(":")  # "nf4:kernels=on" applies to that precision only
        if text and only in ("", bench.precision):
            free_memory()
            phase(section.setdefault("variants", {}), text,
                  lambda t=text: variant(bench, t, peft_model, reference), save)
    return peft_model


def variant(bench: Bench, text: str, peft_model: Any, reference: dict[str, Any]) -> dict[str, Any]:
    """One more engine configuration on the same model and workload: self-check, streams, memory."""
    reset_peak()
    engine = bench.engine("auto", text)
    try:
        result: dict[str, Any] = {
            "engine_modes": {"nf4_mode": engine.nf4_mode, "kernels": engine.runner.kernels,
                             "weight_bytes": weight_bytes(engine.runner), "engine_config": engine_overrides(text)},
            "self_check_rel_err": logits_self_check(engine, peft_model, bench.prompts[0], reference)}
        reset_peak()
        result.update(asyncio.run(engine_suite(engine, bench.prompts, bench.names, bench.args, bench.streams)))
        result["memory"] = gpu_memory()
        return result
    finally:
        engine.stop()


def kernel_mode(bench: Bench) -> dict[str, Any]:
    """The engine with bitsandbytes' 4-bit matmuls instead of dequantised weights (mixed streams only)."""
    engine = bench.engine("kernel")
    try:
        result = asyncio.run(engine_suite(engine, bench.prompts, bench.names, bench.args, bench.streams,
                                          single_adapter_too=False))
        return {**result, "memory": gpu_memory()}
    finally:
        engine.stop()


def phase(section: dict[str, Any], key: str, action: Any, save: Any) -> None:
    """Run one measurement; a failure is recorded under its key and the run goes on to the next one."""
    try:
        section[key] = action()
    except Exception as exc:  # a benchmark keeps the numbers it has and reports the failure
        log.exception("%s failed", key)
        section[key] = {"error": f"{type(exc).__name__}: {exc}"}
    save()


def free_memory() -> None:
    gc.collect()
    if device() == "cuda":
        import torch

        torch.cuda.empty_cache()


def ratios(section: dict[str, Any]) -> dict[str, float | None]:
    vanilla, engine = section["vanilla"], section["engine"]
    s = engine["streams"]
    mixed8 = next((k for k in s if k.startswith("8x") and not k.endswith("x1")), None)
    single32, mixed32 = s.get("32x1"), next((v for k, v in s.items() if k.startswith("32x") and k != "32x1"), None)
    return {
        "batch1_speedup": vanilla["batch1"]["decode_ms_per_token"] / engine["batch1"]["decode_ms_per_token"],
        "mixed8_speedup": s[mixed8]["tok_s"] / vanilla["streams"][mixed8]["tok_s"] if mixed8 else None,
        "mixed_vs_single_32": mixed32["tok_s"] / single32["tok_s"] if mixed32 and single32 else None,
        "ttft_speedup_batch1": vanilla["batch1"]["ttft_ms"] / engine["batch1"]["ttft_ms_p50"],
    }


# -- report -----------------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    lines = [f"device: {report['device']}", "| precision | system | batch-1 ms/tok | TTFT ms | "
             + " | ".join(f"{k} tok/s" for k in report["stream_keys"]) + " | peak GiB |",
             "|---" * (5 + len(report["stream_keys"])) + "|"]
    for precision, section in report["results"].items():
        systems = [(name, section.get(name)) for name in ("vanilla", "engine", "engine_kernel")]
        systems += [(f"engine[{label}]", data) for label, data in section.get("variants", {}).items()]
        for system, data in systems:
            if not data or "batch1" not in data:
                continue
            b1 = data["batch1"]
            cells = [f"{data['streams'][k]['tok_s']:.0f}" if "tok_s" in data["streams"].get(k, {}) else "-"
                     for k in report["stream_keys"]]
            ttft = b1.get("ttft_ms", b1.get("ttft_ms_p50"))
            peak = data.get("memory", {}).get("peak_gib")
            peak_cell = f"{peak:.1f}" if peak is not None else "-"
            lines.append(f"| {precision} | {system} | {b1['decode_ms_per_token']:.2f} | {ttft:.1f} | "
                         + " | ".join(cells) + f" | {peak_cell} |")
        if "ratios" in section:
            lines.append(f"ratios {precision}: " + ", ".join(
                (f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}") + (f" (target {TARGETS[k]})"
                                                                           if k in TARGETS else "")
                for k, v in section["ratios"].items()))
        a = section.get("adapter_load", {})
        if "engine_ms" in a:
            lines.append(f"adapter load {precision}: engine {a['engine_ms']:.0f} ms, PEFT {a['peft_ms']:.0f} ms; "
                         f"self-check rel err vs fp32 {section.get('self_check_rel_err')}")
        if "floor" in section:
            f = section["floor"]
            lines.append(f"floor {precision}: weights {f['weight_bytes'] / 1e9:.2f} GB read in "
                         f"{f['weight_read_ms']:.3f} ms; "
                         f"batch-1 decode {f['batch1_decode_ms']:.3f} ms = {f['batch1_over_floor']:.2f}x")
    return "\n".join(lines)


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
    return info


def main() -> int:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args()
    if args.smoke:
        args.model_dir = args.model_dir.with_name(args.model_dir.name + "-smoke")
        args.prompt_len, args.new_tokens = 16, 8
    streams = [int(s) for s in args.streams.split(",")] if not args.smoke else [2, 4]
    precisions = args.precisions.split(",") if not args.smoke else ["fp32"]
    if not args.smoke and not torch.cuda.is_available():
        log.error("no CUDA device; use --smoke for a CPU check of the script")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True  # what a server would run with; fp32 is not used on GPU here
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "environment": environment(),
        "workload": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "adapters": args.adapters,
                     "rank": 16, "greedy": True, "model": "Phi3Config() defaults, random weights"},
        "stream_keys": [f"{s}x{k}" for s in streams for k in (1, args.adapters)],
        "results": {},
    }

    def save() -> None:
        from persona_router.core.atomic import atomic_write_json

        atomic_write_json(args.out, report)

    started = time.perf_counter()
    if torch.cuda.is_available():
        report["bandwidth"] = copy_bandwidth()
    report["model_build_s"] = build_model(args.model_dir, args.smoke)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, for writing the adapters
        shape_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_dir))
    report["parameters"] = sum(p.numel() for p in shape_model.parameters())
    adapters = write_adapters(shape_model, args.model_dir.parent / f"{args.model_dir.name}-adapters",
                              args.adapters, 16)
    del shape_model
    save()
    for precision in precisions:
        run_precision(precision, args, adapters, streams, report, save)
        free_memory()  # this precision's model before the next one loads
    report["total_s"] = time.perf_counter() - started
    add_floors(report)
    failures = self_check_failures(report)
    report["self_check_failures"] = failures
    save()
    print(table(report))
    if failures:
        print("SELF-CHECK FAILED: " + "; ".join(failures))
        return 1
    return 0


def add_floors(report: dict[str, Any]) -> None:
    """Batch-1 decode against the time to read the engine's weights once at the measured copy bandwidth."""
    bandwidth = report.get("bandwidth", {}).get("tb_s")
    for section in report["results"].values():
        weights = section.get("engine_modes", {}).get("weight_bytes")
        engine = section.get("engine", {})
        if not bandwidth or not weights or "batch1" not in engine:
            continue
        floor_ms = weights / (bandwidth * 1e9)
        decode = engine["batch1"]["decode_ms_per_token"]
        section["floor"] = {"weight_bytes": weights, "weight_read_ms": floor_ms, "batch1_decode_ms": decode,
                            "batch1_over_floor": decode / floor_ms if decode else None}


def self_check_failures(report: dict[str, Any]) -> list[str]:
    failures = []
    for precision, section in report["results"].items():
        variants = section.get("variants", {})
        checked = [("", section), *((f"[{label}] ", data) for label, data in variants.items())]
        for prefix, data in checked:
            if prefix and "error" in data:
                failures.append(f"{precision} {prefix}: {data['error']}")
            for key, value in data.items():
                if isinstance(value, dict) and "error" in value:
                    failures.append(f"{precision} {prefix}{key}: {value['error']}")
            for name, err in data.get("self_check_rel_err", {}).items():
                if not isinstance(err, dict) or "engine" not in err:
                    continue
                bound = DRIFT_FACTOR * err["peft"] + DRIFT_SLACK
                if not err["engine"] <= bound:  # NaN fails too
                    failures.append(f"{precision} {prefix}{name}: engine drifts {err['engine']:.3g} from the float32 "
                                    f"reference, vanilla PEFT {err['peft']:.3g} (bound {bound:.3g})")
        systems = [(system, section.get(system, {})) for system in ("engine", "engine_kernel")]
        systems += [(f"engine[{label}]", data) for label, data in variants.items()]
        for system, data in systems:
            runs = [("batch1", data.get("batch1")), *data.get("streams", {}).items()]
            failures += [f"{precision} {system} {key}: incomplete streams" for key, run in runs
                         if run is not None and not run.get("complete", False)]
    return failures


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
