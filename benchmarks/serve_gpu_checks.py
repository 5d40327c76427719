"""The self-check of ``serve_gpu.py``: the float32 reference, both systems' drift from it, and the rules that make a
run fail; kept together so what counts as a failure can be read in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from benchmarks.serve_gpu_setup import device, free_memory

if TYPE_CHECKING:
    from benchmarks.serve_gpu_precision import Bench

# The self-check compares engine and vanilla PEFT with a float32 reference of the same function (for NF4: the
# dequantised 4-bit weights in float32). Both run in bf16, so both drift; the engine fails the check only
# when its drift is clearly larger than PEFT's: above DRIFT_FACTOR times PEFT's plus DRIFT_SLACK.
DRIFT_FACTOR = 1.5
DRIFT_SLACK = 5e-3


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
