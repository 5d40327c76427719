"""Convert the Cochrane plain-language pairs into `patient` rows for training and evaluation.

Each pair is a review's technical results paragraph (``*.source``, clinician register) and its plain-language
summary (``*.target``), line by line, with the review's DOI (``*.doi``). A row is
``{persona: patient, question: QUESTION, context: <technical paragraph>, answer: <plain summary>, id: <doi>}``:
the persona learns to turn the technical finding into plain words. ``val`` gives the training rows, ``test``
the held-out rows. ``judge_train.jsonl`` adds the demo pack's train answers, so that the evaluation's style
judge can tell the patient register from the five demo registers.

    python benchmarks/cochrane_patient/prepare.py --out /tmp/cochrane-patient

Exits with status 3 and says why when the data folder is absent (it is never copied into the repository).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[2] / "shared" / "data" / "cochrane_plain_language"
QUESTION = "What does this review find, in plain words?"
PERSONA = "patient"
SKIP = 3


def read_split(folder: Path, split: str) -> list[dict[str, str]]:
    sources = (folder / f"{split}.source").read_text(encoding="utf-8").splitlines()
    targets = (folder / f"{split}.target").read_text(encoding="utf-8").splitlines()
    dois = (folder / f"{split}.doi").read_text(encoding="utf-8").splitlines()
    if not len(sources) == len(targets) == len(dois):
        raise SystemExit(f"{folder}/{split}: {len(sources)} sources, {len(targets)} targets, {len(dois)} DOIs")
    rows = []
    for index, (source, target, doi) in enumerate(zip(sources, targets, dois, strict=True)):
        if not source.strip() or not target.strip():
            continue
        rows.append({"persona": PERSONA, "question": QUESTION, "context": source.strip(), "answer": target.strip(),
                     "id": f"{split}-{index:04d}-{doi.strip()}"})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> str:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the cochrane_plain_language folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSONL files (outside the repo)")
    args = parser.parse_args(argv)
    if not (args.data / "val.source").is_file():
        print(f"skipped: {args.data} is absent (the Cochrane data is read from ../shared/data, never copied into "
              "the repository)", file=sys.stderr)
        return SKIP
    from persona_router.core.rows import demo_qa

    args.out.mkdir(parents=True, exist_ok=True)
    train, test = read_split(args.data, "val"), read_split(args.data, "test")
    demo_train = [r.to_json() for r in demo_qa("train")]
    summary = {
        "data": str(args.data), "question": QUESTION,
        "train": {"rows": len(train), "sha256": write_jsonl(args.out / "train.jsonl", train)},
        "test": {"rows": len(test), "sha256": write_jsonl(args.out / "test.jsonl", test)},
        "judge_train": {"rows": len(demo_train) + len(train),
                        "sha256": write_jsonl(args.out / "judge_train.jsonl", demo_train + train)},
    }
    (args.out / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
