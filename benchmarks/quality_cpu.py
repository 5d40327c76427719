"""Do the demo adapters adapt? Train all five on CPU with the defaults, then evaluate them against prompt-only.

Phases (each writes its own JSON under ``--out``, so they can run as separate, shorter jobs):

- ``train``: ``persona-router train --all`` with the CPU defaults into a fresh registry (``--adapters``), timed,
  with the CPU model, its bf16 probes and the load average before and after;
- ``eval``: ``persona-router eval matrix --items all`` (the 10 held-out parallel questions x 5 personas plus
  each persona's 10 own held-out questions: 100 items) twice: with the persona's system prompt (baseline:
  prompt-only) and without it (baseline: the bare base; the adapter must carry the style alone); then
  ``persona-router style-shift`` (per-persona specificity of the loss gain on held-out answers);
- ``report``: ``summary.json`` + ``report.md``: the targets below, each with its number and pass/fail.

The style judge is fitted on the TRAIN split's reference answers only (never on generated text); every
evaluated question is from the test split, which training never reads. Targets (issue 11): adapter answers
judged as their own persona in >= 0.8 of items, >= 0.2 more than prompt-only with the 95% bootstrap CI of the
paired difference above zero; similarity to the references (embedding cosine) not lower than prompt-only;
style-shift specificity > 0 for every persona.

    python benchmarks/quality_cpu.py --phase all --out benchmarks/results/quality_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after the installed package: the repo root holds a bare persona_router folder

from benchmarks.quality_cpu_report import condition_summary, markdown, targets  # noqa: E402

CLI = [sys.executable, "-m", "persona_router"]


def machine() -> dict[str, Any]:
    from persona_router.training.cpu_precision import cpu_bf16_native, cpu_flags_summary

    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    return {"cpu_model": model, "logical_cpus": os.cpu_count(), "torch_probes": cpu_flags_summary(),
            "bf16_native": cpu_bf16_native(), "threads": os.environ.get("PERSONA_ROUTER_THREADS", "all cores")}


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(cmd: list[str], log_path: Path) -> tuple[float, str]:
    print("+", " ".join(cmd), flush=True)
    started = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, check=False)
    seconds = round(time.perf_counter() - started, 1)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}; see {log_path}")
    return seconds, proc.stdout


def epoch_snapshots(folder: Path, persona: str, base_path: str) -> Any:
    """A callback saving the adapter at the end of every epoch (for the learning curve; ~1 s each)."""
    from persona_router.training.trainer import save_adapter
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            # Whole epochs only: a fractional run (e.g. 1.5 epochs) ends at a different fraction for each
            # persona (whole optimizer steps), which would scatter the personas over several snapshots; its
            # final adapter is the published one, which the eval phase evaluates.
            epoch = state.epoch or 0.0
            if abs(epoch - round(epoch)) < 0.01:
                save_adapter(model, folder / f"epoch-{round(epoch)}" / persona, base_path)

    return Snapshot()


def phase_train(args: argparse.Namespace, out: Path) -> None:
    """What ``persona-router train --all`` does (cli/train.py: cmd_train), plus per-epoch snapshots."""
    from persona_router.adapters.base_model import BaseModelConfig, configure_threads, resolve_base
    from persona_router.adapters.offline_default import DEFAULT_BASE
    from persona_router.adapters.registry import AdapterRegistry
    from persona_router.core.pack import load_pack
    from persona_router.training.config import TrainConfig
    from persona_router.training.jobs import plan_jobs
    from persona_router.training.trainer import train_persona

    adapters = Path(args.adapters)
    if any(adapters.glob("*/LATEST")):
        raise SystemExit(f"{adapters} already holds adapters; pass a fresh --adapters folder")
    info: dict[str, Any] = {"machine": machine(), "load_avg_before": load_avg(), "adapters": str(adapters),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "command": "persona-router train --all (same calls as cli/train.py)"}
    config = TrainConfig(epochs=args.epochs) if args.epochs else TrainConfig()
    pack = load_pack("demo")
    jobs = plan_jobs(pack, list(pack.names), eval_fraction=config.eval_fraction)
    base_config = BaseModelConfig(base=args.base or DEFAULT_BASE)
    registry = AdapterRegistry(adapters)
    configure_threads()
    snapshots = adapters.parent / (adapters.name + "-epochs")
    base_path = str(resolve_base(args.base or DEFAULT_BASE).folder)
    started = time.perf_counter()
    results = [train_persona(job, config, base_config, registry,
                             callbacks=[epoch_snapshots(snapshots, job.persona.name, base_path)]) for job in jobs]
    info["wall_s"] = round(time.perf_counter() - started, 1)
    info["load_avg_after"] = load_avg()
    write_train_summary(out, adapters, snapshots, info, [(r.persona, r.version) for r in results])


def write_train_summary(out: Path, adapters: Path, snapshots: Path, info: dict[str, Any],
                        trained: list[tuple[str, int | None]]) -> None:
    """``train.json`` from the published manifests; each epoch snapshot becomes a registry of its own."""
    from persona_router.adapters.registry import AdapterRegistry

    registry = AdapterRegistry(adapters)
    info["personas"] = {}
    for persona, version in trained:
        assert version is not None
        manifest = registry.read_manifest(persona, version)
        raw = json.loads((registry.path(persona, version) / "manifest.json").read_text(encoding="utf-8"))
        metrics = raw["metrics"]
        info["personas"][persona] = {
            "version": version, "steps": metrics["steps"], "epochs": metrics["epochs"],
            "tokens_seen": metrics["tokens_seen"], "train_time_s": metrics["train_time_s"],
            "wall_time_s": metrics["wall_time_s"], "tokens_per_s": metrics["tokens_per_s"],
            "train_loss": metrics["train_loss"], "eval_loss_before": metrics["eval_loss_before"],
            "eval_loss_after": metrics["eval_loss"], "compute_precision": raw.get("compute_precision"),
            "hyperparameters": {k: raw["hyperparameters"][k] for k in (
                "learning_rate", "epochs", "max_steps", "batch_size", "grad_accum", "max_length", "packing",
                "mixed_precision", "prompt_free_fraction", "lora_r", "lora_dropout")}}
        publish_snapshots(snapshots, persona, manifest)
    (out / "train.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"trained {len(trained)} adapters in {info['wall_s']:.0f} s (load {info['load_avg_before']} -> "
          f"{info['load_avg_after']})")


def publish_snapshots(root: Path, persona: str, final: Any) -> None:
    """Turn each epoch's saved adapter into version 1 of a registry of its own (``root/epoch-K``)."""
    import shutil
    from dataclasses import replace

    from persona_router.adapters.manifest import write_manifest
    from persona_router.adapters.registry import AdapterRegistry

    for epoch_dir in sorted(root.glob("epoch-*")):
        folder = epoch_dir / persona
        if not folder.is_dir() or (epoch_dir / "registry" / persona / "LATEST").exists():
            continue
        registry = AdapterRegistry(epoch_dir / "registry")
        staged = registry.staging_dir(persona)
        shutil.rmtree(staged)
        shutil.copytree(folder, staged)
        manifest = replace(final, version=1, extra={**final.extra, "snapshot_epoch": epoch_dir.name})
        write_manifest(staged, manifest)
        registry.publish(persona, staged)


def phase_curve(args: argparse.Namespace, out: Path) -> None:
    """Judge accuracy of each epoch's snapshot (with the system prompt, all items): the learning curve."""
    snapshots = Path(args.adapters).parent / (Path(args.adapters).name + "-epochs")
    curve = []
    wanted = {float(e) for e in args.curve_epochs.split(",")} if args.curve_epochs else None
    for epoch_dir in sorted(snapshots.glob("epoch-*"), key=_epoch_of):
        if wanted is not None and _epoch_of(epoch_dir) not in wanted:
            continue
        report_dir = out / "curve" / epoch_dir.name
        seconds: float | None = None
        source = f"curve/{epoch_dir.name}/report.json"
        if _is_final_epoch(out, epoch_dir) and (out / "with_prompt" / "report.json").is_file():
            # The last epoch's snapshot is the published adapter, which the eval phase already evaluated.
            report_dir, source = out / "with_prompt", "with_prompt/report.json (the published adapters)"
        elif not (report_dir / "report.json").is_file():
            seconds, _ = run([*CLI, "-q", "eval", "matrix", "--adapters", str(epoch_dir / "registry"), "--items",
                              "all", "--max-new-tokens", str(args.max_new_tokens), "--engine", "batched",
                              "--max-batch", str(args.batch_size),
                              "--cochrane-pairs", "0", *(["--limit", str(args.limit)] if args.limit else []),
                              *(["--base", args.base] if args.base else []),
                              "--out", str(report_dir)], out / f"curve_{epoch_dir.name}.log")
        report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
        summary = condition_summary(report)
        curve.append({"epoch": _epoch_of(epoch_dir), "adapter_accuracy": summary["adapter_accuracy"],
                      "prompt_accuracy": summary["baseline_accuracy"], "accuracy_diff": summary["accuracy_diff"],
                      "accuracy_diff_ci": summary["accuracy_diff_ci"],
                      "per_persona_adapter": summary["per_persona_adapter"], "eval_wall_s": seconds,
                      "source": source})
        (out / "curve.json").write_text(json.dumps({"curve": curve, "load_avg": load_avg(),
                                                    "adapters": str(snapshots)}, indent=2) + "\n",
                                        encoding="utf-8")
        print(f"epoch {curve[-1]['epoch']}: judge accuracy {curve[-1]['adapter_accuracy']:.3f}", flush=True)


def phase_judge(args: argparse.Namespace, out: Path) -> None:
    """The judge's Cochrane validity check on its own (the same cached judge ``eval matrix`` fitted on the demo
    TRAIN split), for a run whose eval phase could not see the reference data folder."""
    from persona_router.core.home import home_dir
    from persona_router.core.pack import load_pack
    from persona_router.eval.judge import COCHRANE_DIR, cochrane_check, train_judge
    from persona_router.eval.pipeline import load_records
    from persona_router.router.encoder import load_encoder

    train = load_records(None, load_pack("demo"), split="train")
    encoder = load_encoder()
    judge = train_judge(train, encoder.encode, embedder=encoder.model_id, embedder_fingerprint=encoder.fingerprint,
                        cache_dir=home_dir() / "eval" / "judges", seed=0)
    check = {"judge_key": judge.meta.get("key"), "train_size": judge.meta.get("train_size"),
             "cochrane": cochrane_check(judge, encoder.encode, folder=COCHRANE_DIR, limit=200)}
    (out / "judge_check.json").write_text(json.dumps(check, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(check["cochrane"], indent=1))


def _trained_epochs(folder: Path) -> float | None:
    """The epochs every persona of the run in ``folder`` trained for (from its train.json), if known."""
    train = folder / "train.json"
    if not train.is_file():
        return None
    personas = json.loads(train.read_text(encoding="utf-8"))["personas"].values()
    # The configured epochs: the trained fraction differs per persona when it is not whole (whole steps).
    epochs = {p.get("hyperparameters", {}).get("epochs", p["epochs"]) for p in personas}
    return epochs.pop() if len(epochs) == 1 else None


def _is_final_epoch(out: Path, epoch_dir: Path) -> bool:
    epochs = _trained_epochs(out)
    return epochs is not None and abs(epochs - _epoch_of(epoch_dir)) < 0.01


def _epoch_of(epoch_dir: Path) -> float:
    return float(epoch_dir.name.split("-", 1)[1])


def phase_eval(args: argparse.Namespace, out: Path) -> None:
    info: dict[str, Any] = {"machine": machine(), "load_avg_before": load_avg()}
    common = ["--adapters", args.adapters, "--items", "all", "--max-new-tokens", str(args.max_new_tokens),
              "--engine", "batched", "--max-batch", str(args.batch_size),
              *(["--limit", str(args.limit)] if args.limit else []),
              *(["--base", args.base] if args.base else [])]
    # The judge and its Cochrane check are the same for both runs: check once.
    for name, flags in (("with_prompt", []), ("without_prompt", ["--no-system-prompt", "--cochrane-pairs", "0"])):
        seconds, _ = run([*CLI, "-q", "eval", "matrix", *common, *flags, "--out", str(out / name)],
                         out / f"eval_{name}.log")
        info[f"{name}_wall_s"] = seconds
    seconds, _ = run([*CLI, "-q", "style-shift", "--adapters", args.adapters, "--out", str(out / "style_shift.json")],
                     out / "style_shift.log")
    info["style_shift_wall_s"] = seconds
    info["load_avg_after"] = load_avg()
    (out / "eval.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def phase_report(args: argparse.Namespace, out: Path) -> None:
    train = json.loads((out / "train.json").read_text(encoding="utf-8"))
    evals = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    shift = json.loads((out / "style_shift.json").read_text(encoding="utf-8"))
    reports = {name: json.loads((out / name / "report.json").read_text(encoding="utf-8"))
               for name in ("with_prompt", "without_prompt")}
    conditions = {name: condition_summary(r) for name, r in reports.items()}
    judge = reports["with_prompt"]["judge"]
    cochrane = judge.get("cochrane", {})
    if cochrane.get("status") != "ok" and (out / "judge_check.json").is_file():
        cochrane = json.loads((out / "judge_check.json").read_text(encoding="utf-8"))["cochrane"]
    summary = {
        "benchmark": "quality_cpu", "machine": train["machine"], "train": train, "eval": evals,
        "conditions": conditions,
        "style_shift_specificity": shift["specificity"],
        "targets_with_prompt": targets(conditions["with_prompt"], shift),
        "targets_without_prompt": targets(conditions["without_prompt"], shift),
        "judge": {"train_size": judge.get("train_size"), "feature_set": judge.get("feature_set"),
                  "heldout_accuracy": judge.get("heldout", {}).get("accuracy"),
                  "cochrane_two_class_accuracy": cochrane.get("two_class_accuracy"),
                  "cochrane_pair_order_accuracy": cochrane.get("pair_order_accuracy"),
                  "cochrane_pairs": cochrane.get("pairs"), "cochrane_status": cochrane.get("status")},
        "learning_curve": _curve(Path(args.curve_dir) if args.curve_dir else out),
        "generation": {k: reports["with_prompt"]["meta"]["config"].get(k)
                       for k in ("max_new_tokens", "temperature", "engine", "max_batch", "max_context_chars")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(summary), encoding="utf-8")
    print((out / "report.md").read_text(encoding="utf-8"))


def _curve(folder: Path) -> dict[str, Any] | None:
    """The learning curve: per-epoch snapshots of one training run (its train.json says how many epochs)."""
    if not (folder / "curve.json").is_file():
        return None
    curve = json.loads((folder / "curve.json").read_text(encoding="utf-8"))
    return {"folder": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
            "run_epochs": _trained_epochs(folder), "points": curve["curve"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=("train", "eval", "judge", "curve", "report", "all"), default="all")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/quality_cpu"))
    parser.add_argument("--adapters", default=None, help="registry for the trained adapters (default: OUT/../"
                        "$PERSONA_ROUTER_HOME/quality-adapters)")
    parser.add_argument("--epochs", type=float, default=None, help="override the CPU default epochs")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--curve-dir", default=None, help="report: read curve.json and train.json from this folder "
                        "(a separate, longer training run) instead of --out")
    parser.add_argument("--curve-epochs", default=None, help="curve phase: only these epoch snapshots (e.g. 3,4)")
    parser.add_argument("--limit", type=int, default=None, help="smoke runs only: questions per item kind")
    parser.add_argument("--base", default=None, help="smoke runs only: another base model folder")
    args = parser.parse_args()
    if args.adapters is None:
        from persona_router.core.home import home_dir

        args.adapters = str(home_dir() / "quality-adapters")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phases = ("train", "eval", "report") if args.phase == "all" else (args.phase,)
    for phase in phases:
        {"train": phase_train, "eval": phase_eval, "judge": phase_judge, "curve": phase_curve,
         "report": phase_report}[phase](args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
