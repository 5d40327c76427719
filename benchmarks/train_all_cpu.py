"""Time ``persona-router train --all`` with the CPU defaults into a fresh adapter registry; write one JSON.

The wall time covers the whole command (interpreter start, loading the base once per persona, evaluating,
training, publishing); each persona's own numbers come from the manifests it published. Run it on free cores:
another busy process on a 2-core machine slows the trainer by half, so the JSON records the load average
before and after and the CPU model with its bf16 instructions.

    python benchmarks/train_all_cpu.py --out benchmarks/results/train_all_cpu.json
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
MANIFEST_METRICS = ("steps", "epochs", "tokens_seen", "train_time_s", "wall_time_s", "tokens_per_s",
                    "eval_loss_before", "eval_loss")


def cpu_model() -> str:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown")


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def persona_rows(registry: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for folder in sorted(p for p in registry.iterdir() if (p / "LATEST").exists()):
        version = (folder / "LATEST").read_text().strip()
        manifest = json.loads((folder / version / "manifest.json").read_text())
        row = {key: manifest["metrics"].get(key) for key in MANIFEST_METRICS}
        row["compute_precision"] = manifest.get("compute_precision")
        row["attention"] = manifest.get("hyperparameters", {}).get("attention")
        rows[folder.name] = row
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train_all_cpu.json"))
    parser.add_argument("--cli", default=str(Path(sys.executable).with_name("persona-router")),
                        help="the persona-router command to time (default: the one beside this interpreter)")
    args = parser.parse_args()
    from persona_router.training.cpu_precision import cpu_flags_summary

    with tempfile.TemporaryDirectory(prefix="train-all-") as tmp:
        registry = Path(tmp) / "adapters"
        command = [args.cli, "train", "--all", "--adapters", str(registry)]
        report: dict[str, Any] = {
            "benchmark": "train_all_cpu", "command": "persona-router train --all --adapters <fresh folder>",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": _commit(),
            "cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "torch_probes": cpu_flags_summary(),
            "load_avg_before": load_avg()}
        started = time.perf_counter()
        status = subprocess.run(command, check=False).returncode
        report["wall_s"] = round(time.perf_counter() - started, 1)
        report["exit_status"] = status
        report["load_avg_after"] = load_avg()
        personas = persona_rows(registry) if registry.exists() else {}
    report["tokens_total"] = sum(row["tokens_seen"] or 0 for row in personas.values())
    report["personas"] = personas
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "personas"}, indent=1))
    return status


def _commit() -> str:
    result = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False)
    return result.stdout.strip() or "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
