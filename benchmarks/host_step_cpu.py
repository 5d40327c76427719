"""The engine's own host work per decode step, without the model: how much of a serving step is Python.

Builds the tiny random Phi-3 of the unit tests, admits ``--rows`` requests and runs one real step (prefill and
a first decode), then swaps the step's model call for a stub that returns fixed logits and times the
scheduler's step and the event dispatch over ``--steps`` steps: building the step's inputs, the summary
transfer, token choice, detokenisation and the per-stream events. Prints the median and 90th percentile in
milliseconds with the CPU and load average; ``--profile`` adds a cProfile listing.

    python benchmarks/host_step_cpu.py --rows 64 --steps 100
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after the installed package: the repo root holds a bare persona_router folder


def engine(rows: int, folder: Path) -> Any:
    from persona_router.adapters.engine import BatchedEngine, EngineConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.support.random_model import build_tiny_model

    build_tiny_model(folder)
    return BatchedEngine(AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder),
                         EngineConfig(max_batch=rows, max_len=512))


async def measure(eng: Any, rows: int, steps: int, profile: bool) -> list[float]:
    import torch
    from persona_router.adapters.engine_api import GenerationRequest
    from persona_router.adapters.generation import SamplingConfig

    for i in range(rows):
        eng.submit(GenerationRequest(f"r{i}", tuple(range(5, 21)), None, SamplingConfig(max_new_tokens=steps + 50)))
    inbox, commands = eng._take_pending()
    eng._apply_pending(inbox, commands)
    eng.scheduler.step([])  # the real prefill and first decode
    logits = torch.randn(rows, 64)

    def stub(n: int, kv_len: int, m: int) -> Any:
        eng.runner.summary[0, :n] = 7  # what the step's graph computes beside its logits
        eng.runner.summary[1, :n] = 1
        return logits

    eng.scheduler.decoder = stub
    times = []
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    for _ in range(steps):
        out: list[Any] = []
        started = time.perf_counter()
        eng.scheduler.step(out)
        eng._dispatch(out)
        times.append((time.perf_counter() - started) * 1e3)
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(15)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    import os

    import torch

    from benchmarks.machine import cpu_model

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        eng = engine(args.rows, Path(tmp) / "tiny")
        times = asyncio.run(measure(eng, args.rows, args.steps, args.profile))
    times.sort()
    print(f"{cpu_model()}, load average {os.getloadavg()[0]:.2f}: host work per {args.rows}-row decode step "
          f"(stub model) median {statistics.median(times):.3f} ms, p90 {times[int(0.9 * len(times))]:.3f} ms "
          f"over {args.steps} steps")


if __name__ == "__main__":
    main()
