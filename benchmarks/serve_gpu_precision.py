"""One precision's phases of ``serve_gpu.py``: the engine against vanilla PEFT on one loaded model, further engine
configurations and the ratios; each phase records its failure and the run goes on, so a cut-short run keeps its
numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.serve_gpu_checks import logits_self_check, reference_logits
from benchmarks.serve_gpu_runs import engine_suite, time_adapter_loads, vanilla_suite
from benchmarks.serve_gpu_setup import free_memory, gpu_memory, load_model, make_prompts, reset_peak, weight_bytes

log = logging.getLogger("serve_gpu")  # one logger name for the whole benchmark's output


def engine_overrides(text: str) -> dict[str, Any]:
    """``key=value,key=value`` as EngineConfig keyword arguments, each value converted to its field's type
    (``int`` fields such as ``lora_kernel_rows``, or ``str``); a key that names no such field, or a number that is
    not one, stops the run."""
    from dataclasses import fields

    from persona_router.adapters.engine import EngineConfig

    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--engine-config wants key=value pairs, got {text!r}")
    types = {f.name: str(f.type) for f in fields(EngineConfig)}  # annotations are strings here ("int", "str")
    settable = sorted(name for name, kind in types.items() if kind in ("int", "str"))
    out: dict[str, Any] = {}
    for key, value in ((k.strip(), v.strip()) for k, v in pairs):
        if key not in settable:
            raise SystemExit(f"{key!r} is no EngineConfig field settable here; choose from {', '.join(settable)}")
        try:
            out[key] = int(value) if types[key] == "int" else value
        except ValueError:
            raise SystemExit(f"{key} wants a whole number, got {value!r}") from None
    return out


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
