"""Measure the offline default's two possible layouts: SmolLM2 as Llama vs repacked into Phi-3.

Loads the GGUF's Llama model, repacks it, and compares logits on a chat prompt and greedy-decoding speed
(interleaved repetitions, so machine load hits both alike). Writes JSON to --out.

    python benchmarks/repack_check.py --out benchmarks/results/repack_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/repack_check.json"))
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from persona_router.adapters.offline_default import gguf_path, repack_llama_as_phi3
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    llama = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    phi3 = repack_llama_as_phi3(llama)
    prompts = ["Why is the sky blue?", "Explain recursion with an example.", "What is the dose of amoxicillin?"]
    max_diff = 0.0
    same_tokens = True
    timings: dict[str, list[float]] = {"llama": [], "phi3": []}
    for _ in range(args.repeats):
        for text in prompts:
            enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
            with torch.no_grad():
                max_diff = max(max_diff, (llama(**enc).logits - phi3(**enc).logits).abs().max().item())
            outputs = {}
            for name, model in (("llama", llama), ("phi3", phi3)):
                started = time.perf_counter()
                with torch.no_grad():
                    outputs[name] = model.generate(**enc, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                                   do_sample=False)
                timings[name].append(args.tokens / (time.perf_counter() - started))
            same_tokens = same_tokens and torch.equal(outputs["llama"], outputs["phi3"])
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "max_abs_logit_diff": max_diff,
        "greedy_tokens_identical": same_tokens,
        "tokens_per_s_median": {k: round(statistics.median(v), 2) for k, v in timings.items()},
        "runs_per_layout": len(timings["llama"]),
        "new_tokens_per_run": args.tokens,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
