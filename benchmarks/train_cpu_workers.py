"""CPU training: one process over every core against one single-thread process per core, running at once.

Runs ``benchmarks/train_cpu_throughput.py --variants trainer-after`` (the trainer ``persona-router train``
runs, on the student rows) three ways: alone with one torch thread per core, alone with one thread, and as
one single-thread process per core started together. The sum of the concurrent processes' tokens/s against
the first is what ``train --all`` gains by training one persona per core (``training/parallel.py``).
Run it on free cores; the JSON records the CPU model and the load average.

    python benchmarks/train_cpu_workers.py --out benchmarks/results/train_cpu_workers.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT = ROOT / "benchmarks" / "train_cpu_throughput.py"


def start(threads: int, out: Path, steps: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PERSONA_ROUTER_THREADS": str(threads)}
    command = [sys.executable, str(THROUGHPUT), "--variants", "trainer-after", "--steps", str(steps), "--out",
               str(out)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rate(out: Path) -> dict[str, Any]:
    row = json.loads(out.read_text())["results"][0]
    return {"tokens_per_s": row["tokens_per_s"], "tokens": row["tokens"], "seconds": row["seconds"]}


def run_together(threads: list[int], folder: Path, name: str, steps: int) -> list[dict[str, Any]]:
    outs = [folder / f"{name}-{i}.json" for i in range(len(threads))]
    processes = [start(t, out, steps) for t, out in zip(threads, outs, strict=True)]
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"{THROUGHPUT.name} failed (exit {process.returncode})")
    return [rate(out) for out in outs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train_cpu_workers.json"))
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per process")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
    report: dict[str, Any] = {
        "benchmark": "train_cpu_workers", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_model": next((x.split(":", 1)[1].strip() for x in lines if x.startswith("Model name")), "unknown"),
        "logical_cpus": cores, "steps": args.steps, "load_avg_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="train-workers-") as tmp:
        folder = Path(tmp)
        report["one_process_all_threads"] = run_together([cores], folder, "all", args.steps)[0]
        report["one_process_one_thread"] = run_together([1], folder, "one", args.steps)[0]
        together = run_together([1] * cores, folder, "together", args.steps)
    report["one_thread_process_per_core_together"] = together
    total = sum(row["tokens_per_s"] for row in together)
    report["together_total_tokens_per_s"] = round(total, 1)
    report["together_vs_one_process"] = round(total / report["one_process_all_threads"]["tokens_per_s"], 2)
    report["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
