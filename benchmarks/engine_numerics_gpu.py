"""How far bf16 decoding drifts from float32 on a Phi-3-mini-shaped random model: engine vs vanilla PEFT.

``serve_gpu.py`` compares the engine's bf16 logits with PEFT's bf16 logits directly. Both round, in
different orders, so their gap alone does not say which is off. This script measures each against a float32
PEFT reference on the same weights and prompts (last-token prefill logits, relative L2 error): if the engine's
error is no larger than PEFT's own, the engine is as accurate as vanilla bf16 inference.

    python benchmarks/engine_numerics_gpu.py --out benchmarks/results/engine_numerics_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_gpu


def last_logits_peft(model: Any, prompts: list[tuple[int, ...]], name: str) -> list[Any]:
    import torch

    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=model.device)
            out.append(model(input_ids=ids, adapter_names=[name]).logits[0, -1].float().cpu())
    return out


def last_logits_engine(engine: Any, prompts: list[tuple[int, ...]], name: str | None) -> list[Any]:
    from persona_router.adapters.engine.lora_bank import slot_bucket

    out = []
    for prompt in prompts:
        slot = engine.bank.acquire(name)
        try:
            logits = engine.runner.prefill([0], [list(prompt)], [slot], slot_bucket(slot, engine.bank.capacity))[0]
        finally:
            engine.bank.release(slot)
        out.append(logits.float().cpu())
    return out


def rel_errors(got: list[Any], ref: list[Any]) -> list[float]:
    return [float((g - r).norm() / r.norm()) for g, r in zip(got, ref, strict=True)]


def peft_with_adapter(folder: Path, precision: str, adapter: Path) -> Any:
    from peft import PeftModel

    model = serve_gpu.load_model(folder, precision)
    return PeftModel.from_pretrained(model, str(adapter), adapter_name="a0").eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/persona-router-bench/phi3-mini-random"))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script only")
    args = parser.parse_args()

    import torch
    from persona_router.adapters.engine import BatchedEngine, EngineConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    serve_gpu.build_model(args.model_dir, smoke=args.smoke)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_dir))
    adapter = serve_gpu.write_adapters(shape, args.model_dir.parent / "numerics-adapters", 1, 16)[0]
    prompts = serve_gpu.make_prompts(args.prompts, 128, shape.config.vocab_size if not args.smoke else 400)
    del shape

    reference = peft_with_adapter(args.model_dir, "fp32", adapter)
    ref = {name: last_logits_peft(reference, prompts, name) for name in ("__base__", "a0")}
    del reference
    torch.cuda.empty_cache()

    vanilla = peft_with_adapter(args.model_dir, "bf16", adapter)
    peft_err = {name: rel_errors(last_logits_peft(vanilla, prompts, name), ref[name]) for name in ref}
    base_model = vanilla.unload()  # drop LoRA layers; the engine reads the plain bf16 weights
    engine = BatchedEngine(base_model, serve_gpu_tokenizer(args.model_dir),
                           EngineConfig(max_batch=4, max_len=256, max_adapters=2, max_rank=16, stop_token_ids=()))
    engine.add_adapter("a0", adapter)
    engine_err = {"__base__": rel_errors(last_logits_engine(engine, prompts, None), ref["__base__"]),
                  "a0": rel_errors(last_logits_engine(engine, prompts, "a0"), ref["a0"])}
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)",
        "model": "Phi3Config() defaults (3.82B), random weights, bf16 vs float32 reference (TF32 off)",
        "metric": "relative L2 error of last-token prefill logits vs float32 PEFT, median over prompts",
        "prompts": args.prompts,
        "vanilla_peft_bf16": {k: statistics.median(v) for k, v in peft_err.items()},
        "engine_bf16": {k: statistics.median(v) for k, v in engine_err.items()},
        "all": {"vanilla_peft_bf16": peft_err, "engine_bf16": engine_err},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("device", "vanilla_peft_bf16", "engine_bf16")}, indent=2))
    return 0


def serve_gpu_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


if __name__ == "__main__":
    sys.exit(main())
