"""Copy an `eval ab` report into the repository without the Cochrane text it quotes.

The report names each held-out item by its review DOI; the reference summaries (Cochrane's text) are replaced
by their sha256 and word count, so that the committed report carries only our model's answers and the scores.

    python benchmarks/cochrane_patient/publish_report.py REPORT_DIR benchmarks/results/cochrane_patient/ab
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

NOTE = "(the Cochrane plain-language summary; not copied into the repository: see the DOI in the item id)"


def main(source: Path, target: Path) -> int:
    target.mkdir(parents=True, exist_ok=True)
    report = json.loads((source / "report.json").read_text(encoding="utf-8"))
    for item in report["items"]:
        text = item.pop("reference")
        item["reference_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        item["reference_words"] = len(text.split())
    (target / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = [f"- reference: {NOTE}" if line.startswith("- reference: ") else line
             for line in (source / "report.md").read_text(encoding="utf-8").splitlines()]
    (target / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for png in source.glob("*.png"):
        shutil.copy2(png, target / png.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
