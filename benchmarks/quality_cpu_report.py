"""The report half of ``quality_cpu.py``: per-condition summaries of an eval matrix report, the targets of
issue 11, and the Markdown report (pure functions of the JSON the phases wrote).
"""

from __future__ import annotations

from typing import Any


def _comparison(report: dict[str, Any], metric: str) -> dict[str, Any]:
    return next(c for c in report["comparisons"] if c["metric"] == metric)


def _subset_accuracy(report: dict[str, Any], arm: str, parallel: bool) -> float | None:
    hits = [row[arm]["metrics"]["judge_hit"] for row in report["items"]
            if arm in row and (":" in row["id"]) == parallel and row[arm]["metrics"]["judge_hit"] is not None]
    return round(sum(hits) / len(hits), 3) if hits else None


def condition_summary(report: dict[str, Any]) -> dict[str, Any]:
    hit, cosine = _comparison(report, "judge_hit"), _comparison(report, "embedding_cosine")
    adapter, prompt = report["conditions"]["adapter"], report["conditions"]["prompt"]
    return {
        "n_items": adapter["n"], "baseline": report.get("baseline", "prompt"),
        "n_parallel": sum(":" in row["id"] for row in report["items"] if "adapter" in row),
        "n_own": sum(":" not in row["id"] for row in report["items"] if "adapter" in row),
        "adapter_accuracy": round(adapter["accuracy"], 3), "baseline_accuracy": round(prompt["accuracy"], 3),
        "accuracy_diff": round(hit["mean_diff"], 3), "accuracy_diff_ci": [round(hit["ci_low"], 3),
                                                                          round(hit["ci_high"], 3)],
        "adapter_accuracy_parallel": _subset_accuracy(report, "adapter", True),
        "adapter_accuracy_own": _subset_accuracy(report, "adapter", False),
        "baseline_accuracy_parallel": _subset_accuracy(report, "prompt", True),
        "baseline_accuracy_own": _subset_accuracy(report, "prompt", False),
        "per_persona_adapter": {k: round(v, 3) for k, v in adapter["per_persona_accuracy"].items()},
        "per_persona_baseline": {k: round(v, 3) for k, v in prompt["per_persona_accuracy"].items()},
        "cosine_adapter": round(cosine["mean_a"], 4), "cosine_baseline": round(cosine["mean_b"], 4),
        "cosine_diff": round(cosine["mean_diff"], 4), "cosine_diff_ci": [round(cosine["ci_low"], 4),
                                                                        round(cosine["ci_high"], 4)],
        "mean_adherence_adapter": round(adapter["mean_adherence"], 3),
        "mean_adherence_baseline": round(prompt["mean_adherence"], 3),
        "confusion_adapter": adapter["confusion"], "confusion_baseline": prompt["confusion"],
        "classes": adapter["classes"],
    }


def targets(summary: dict[str, Any], shift: dict[str, Any]) -> dict[str, Any]:
    c = summary
    spec = shift["specificity"]
    return {
        "adapter_accuracy_ge_0.8": c["adapter_accuracy"] >= 0.8,
        "accuracy_gain_ge_0.2": c["accuracy_diff"] >= 0.2,
        "accuracy_gain_ci_above_0": c["accuracy_diff_ci"][0] > 0,
        # "no lower than prompt-only": the paired difference is not detectably negative.
        "cosine_not_lower": c["cosine_diff_ci"][1] >= 0,
        "style_shift_specificity_positive_all": all(v > 0 for v in spec.values()),
    }


def markdown(s: dict[str, Any]) -> str:
    t, m = s["train"], s["machine"]
    first = next(iter(t["personas"].values()))
    lines = ["# Quality on CPU: do the demo adapters adapt?", "",
             f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, bf16 native: {m['bf16_native']}.", "",
             "## Training (`persona-router train --all`, CPU defaults)", "",
             f"{len(t['personas'])} personas in **{t['wall_s']:.0f} s** wall (load average before "
             f"{t['load_avg_before']}, after {t['load_avg_after']}); settings: {first['hyperparameters']}, "
             f"compute: {first['compute_precision']}.", "",
             *([t["note"], ""] if t.get("note") else []),
             "| persona | steps | epochs | train s | tokens/s | eval loss before -> after |",
             "|---|---|---|---|---|---|"]
    for name, p in t["personas"].items():
        lines.append(f"| {name} | {p['steps']} | {p['epochs']:.1f} | {p['train_time_s']:.0f} | {p['tokens_per_s']:.0f}"
                     f" | {p['eval_loss_before']} -> {p['eval_loss_after']} |")
    for name, title in (("with_prompt", "With the persona's system prompt (baseline: prompt-only)"),
                        ("without_prompt", "Without any persona system prompt (baseline: the bare base)")):
        c = s["conditions"][name]
        tg = s[f"targets_{name}"]
        lines += ["", f"## {title}", "",
                  f"n = {c['n_items']} items ({c['n_parallel']} parallel-question items, {c['n_own']} own-question "
                  "items), greedy, "
                  f"{s['generation']['max_new_tokens']} new tokens.", "",
                  "| | adapter | baseline | paired difference (95% CI) | target met |", "|---|---|---|---|---|",
                  f"| judge: own persona (all items) | **{c['adapter_accuracy']:.3f}** | {c['baseline_accuracy']:.3f} "
                  f"| {c['accuracy_diff']:+.3f} [{c['accuracy_diff_ci'][0]:+.3f}, {c['accuracy_diff_ci'][1]:+.3f}] | "
                  f">=0.8: {_yes(tg['adapter_accuracy_ge_0.8'])}; gain >=0.2: {_yes(tg['accuracy_gain_ge_0.2'])}; "
                  f"CI>0: {_yes(tg['accuracy_gain_ci_above_0'])} |",
                  f"| judge: parallel / own items | {c['adapter_accuracy_parallel']} / {c['adapter_accuracy_own']} | "
                  f"{c['baseline_accuracy_parallel']} / {c['baseline_accuracy_own']} | | |",
                  f"| embedding cosine to reference | {c['cosine_adapter']:.4f} | {c['cosine_baseline']:.4f} | "
                  f"{c['cosine_diff']:+.4f} [{c['cosine_diff_ci'][0]:+.4f}, {c['cosine_diff_ci'][1]:+.4f}] | "
                  f"not lower: {_yes(tg['cosine_not_lower'])} |", "",
                  "Per persona (judge accuracy, adapter / baseline): " + ", ".join(
                      f"{p} {a:.2f} / {c['per_persona_baseline'][p]:.2f}"
                      for p, a in c["per_persona_adapter"].items()) + "."]
    if s.get("learning_curve"):
        lc = s["learning_curve"]
        lines += ["", f"## Learning curve (end-of-epoch snapshots of one {lc['run_epochs']}-epoch run per persona, "
                  f"`{lc['folder']}`; with the system prompt, all items)",
                  "", "| epochs | judge accuracy (adapter) | prompt-only | difference (95% CI) | per persona |",
                  "|---|---|---|---|---|"]
        for p in lc["points"]:
            lines.append(f"| {p['epoch']} | {p['adapter_accuracy']:.3f} | {p['prompt_accuracy']:.3f} | "
                         f"{p['accuracy_diff']:+.3f} [{p['accuracy_diff_ci'][0]:+.3f}, {p['accuracy_diff_ci'][1]:+.3f}]"
                         " | " + ", ".join(f"{k} {v:.2f}" for k, v in p["per_persona_adapter"].items()) + " |")
    spec = s["style_shift_specificity"]
    j = s["judge"]
    lines += ["", "## Style shift (loss gain on own vs other personas' held-out answers)", "",
              "Specificity: " + ", ".join(f"{p} {v:+.3f}" for p, v in spec.items()) +
              f"; all positive: {_yes(s['targets_with_prompt']['style_shift_specificity_positive_all'])}.", "",
              "## The judge", "",
              f"Fitted on {j['train_size']} train-split reference answers ({j['feature_set']}); held-out accuracy on "
              f"the test split's references {j['heldout_accuracy']}; Cochrane check ({j['cochrane_status']}, "
              f"{j['cochrane_pairs']} pairs): 2-class accuracy {j['cochrane_two_class_accuracy']}, pairwise ranking "
              f"rate {j['cochrane_pair_order_accuracy']}.", ""]
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"
