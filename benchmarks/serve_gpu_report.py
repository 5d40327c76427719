"""The summary of ``serve_gpu.py``: its table and the bandwidth floor the table quotes, both derived from the
finished report after every measurement, so they change without touching how anything is measured.
"""

from __future__ import annotations

from typing import Any

TARGETS = {"batch1_speedup": 6.0, "mixed8_speedup": 5.0, "mixed_vs_single_32": 0.8}


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
