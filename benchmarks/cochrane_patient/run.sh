#!/usr/bin/env bash
# The worked example end to end: a `patient` persona from the Cochrane plain-language summaries.
# Run from the repository root with the project's .venv. The data is read from ../shared/data (or $COCHRANE);
# the converted rows go to $WORK (outside the repository). Every step is an ordinary persona-router command.
set -euo pipefail
export PERSONA_ROUTER_HOME=${PERSONA_ROUTER_HOME:-$HOME/.cache/persona-router}
COCHRANE=${COCHRANE:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/data/cochrane_plain_language}
WORK=${WORK:-$PERSONA_ROUTER_HOME/cochrane}
OUT=${OUT:-benchmarks/results/cochrane_patient}
STEPS=${STEPS:-8}
PR=".venv/bin/persona-router"

# 1. Convert: val -> training rows, test -> held-out rows (exit 3 with the reason when the data is absent).
.venv/bin/python benchmarks/cochrane_patient/prepare.py --data "$COCHRANE" --out "$WORK"

# 2. The persona: the user pack is created from the demo pack the first time.
$PR persona add patient --replace \
  --description "Patients and their families who want to know, in plain everyday words, what the research on a treatment found and what it means for them." \
  --system-prompt "You are a health writer answering a patient or a family member. Explain what the research found in plain, everyday words: short sentences, no statistics or jargon (say what any medical term means), how sure the evidence is, and what it means for people like them." \
  --examples benchmarks/cochrane_patient/examples.txt

# 3. Train its adapter on the offline base (CPU: 1 thread, 512-token rows, contexts cut to fit).
PERSONA_ROUTER_THREADS=1 $PR train --pack user --persona patient --data "$WORK/train.jsonl" \
  --eval-data "$WORK/test.jsonl" --set eval_max_rows=6 --max-steps "$STEPS" --max-length 512 \
  --adapters "$WORK/adapters-train" --json | tee "$WORK/train.json"

# 4. Refit the router for the new pack (one command, written atomically).
$PR fit-router --pack user --test none

# 5. A/B on held-out test rows: the adapter against prompt-only, batched generation.
$PR eval ab --pack user --persona patient --a patient@latest --b prompt --adapters "$WORK/adapters-train" \
  --data "$WORK/test.jsonl" --train-data "$WORK/judge_train.jsonl" --engine batched --max-batch 24 \
  --quantization bf16 --max-context-chars 1000 --cochrane-pairs 0 --limit "${LIMIT:-100}" --max-new-tokens "${NEW:-128}" --out "$WORK/ab"
.venv/bin/python benchmarks/cochrane_patient/publish_report.py "$WORK/ab" "$OUT/ab"   # without Cochrane text

# 6. Hot-add to a running server: serve without the persona, add it, publish the adapter, remove it.
.venv/bin/python benchmarks/cochrane_patient/hot_add.py --adapter "$WORK/adapters-train/patient/$(cat "$WORK/adapters-train/patient/LATEST")" \
  --test "$WORK/test.jsonl" --out "$OUT/hot_add.json"
