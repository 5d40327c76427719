"""The two evaluations end to end: load items, fit the judge, generate with each arm, score, compare.

``run_ab`` compares two arms on one persona's items; ``run_matrix`` has every persona's adapter (and the
``prompt`` baseline) answer the same parallel questions and asks the judge whom each answer sounds like.
Both return a JSON-ready report dict; ``eval.report`` writes it out.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from persona_router.adapters.base_model import BaseModelConfig
from persona_router.adapters.generation import SamplingConfig
from persona_router.core.errors import DataError
from persona_router.core.pack import PersonaPack
from persona_router.core.records import QARecord
from persona_router.eval.arms import DEFAULT_MAX_CONTEXT_CHARS, ArmAnswer, ArmRunner, EvalItem, ResolvedArm, resolve_arm
from persona_router.eval.batched import EngineArmRunner
from persona_router.eval.judge import COCHRANE_DIR, StyleJudge, cochrane_check, confusion, heldout_report, train_judge
from persona_router.eval.metrics import METRICS, ReferenceRange, reference_range, text_metrics
from persona_router.eval.specs import ArmSpec, parse_spec
from persona_router.eval.stats import PairedComparison, StatsConfig, compare_paired, not_compared

log = logging.getLogger(__name__)

ENGINES = ("sequential", "batched")
Progress = Callable[[int], None]
ProgressFactory = Callable[[int, str], Any]  # (total, description) -> context manager yielding Progress


@dataclass(frozen=True)
class EvalConfig:
    """Everything an evaluation run depends on; recorded in the report."""

    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=160))
    adapters_root: Path | None = None
    data: str | None = None  # None: the demo test split
    train_data: str | None = None  # judge + readability ranges; None: the demo train split
    limit: int | None = None
    seed: int = 0
    max_context_chars: int = DEFAULT_MAX_CONTEXT_CHARS
    cochrane_pairs: int = 200
    stats: StatsConfig = field(default_factory=StatsConfig)
    engine: str = "sequential"  # "batched": every answer queued at once in the batched engine (eval ab)
    max_batch: int = 16

    def __post_init__(self) -> None:
        from persona_router.core.errors import ConfigError, choices

        if self.engine not in ENGINES:
            raise ConfigError(f"{self.engine!r} is not one of {choices(ENGINES)}", field="engine")
        if self.max_batch < 1:
            raise ConfigError(f"{self.max_batch} must be >= 1", field="max_batch")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{self.limit} must be >= 1", field="limit")
        if self.cochrane_pairs < 0:
            raise ConfigError(f"{self.cochrane_pairs} must be >= 0", field="cochrane_pairs")
        if self.max_context_chars < 0:  # here, not after the judge is fitted and the base loaded
            raise ConfigError(f"{self.max_context_chars} must be >= 0", field="max_context_chars")

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base.base, "device": self.base.device, "quantization": self.base.quantization,
                "max_new_tokens": self.sampling.max_new_tokens, "temperature": self.sampling.temperature,
                "top_p": self.sampling.top_p, "adapters_root": str(self.adapters_root) if self.adapters_root else None,
                "data": self.data or "demo test split", "train_data": self.train_data or "demo train split",
                "limit": self.limit, "seed": self.seed, "max_context_chars": self.max_context_chars,
                "cochrane_pairs": self.cochrane_pairs, "n_boot": self.stats.n_boot, "engine": self.engine,
                "max_batch": self.max_batch,
                "confidence": self.stats.confidence, "alpha": self.stats.alpha}


# --- data ---------------------------------------------------------------------------------------------------

def load_records(source: str | None, pack: PersonaPack, *, split: str) -> list[QARecord]:
    from persona_router.core.rows import demo_qa
    from persona_router.training.loading import load_qa

    if source is None:
        if pack.name != "demo":
            raise DataError(f"pack {pack.name!r} has no demo data; pass --data and --train-data", field="data")
        return demo_qa(split)
    return load_qa(source, pack, split=split).records


def ab_items(records: Sequence[QARecord], persona: str, limit: int | None) -> list[EvalItem]:
    items = [EvalItem.from_record(r, i) for i, r in enumerate(records) if r.persona == persona]
    if not items:
        raise DataError(f"no evaluation items for persona {persona!r}", field="persona")
    return items[:limit] if limit else items


MATRIX_ITEMS = ("parallel", "own", "all")


def matrix_items(records: Sequence[QARecord], personas: Sequence[str], limit: int | None,
                 kind: str = "parallel") -> list[EvalItem]:
    """``parallel``: each parallel question once per persona, the reference being that persona's own answer to
    it; ``own``: each persona's own held-out questions (no ``parallel_id``); ``all``: both. ``limit`` caps the
    parallel questions and the own questions per persona."""
    if kind not in MATRIX_ITEMS:
        from persona_router.core.errors import ConfigError

        raise ConfigError(f"{kind!r} is not one of {', '.join(MATRIX_ITEMS)}", field="items")
    items = _parallel_items(records, personas, limit) if kind in ("parallel", "all") else []
    if kind in ("own", "all"):
        for persona in personas:
            own = [r for r in records if r.persona == persona and not r.parallel_id]
            items += [EvalItem.from_record(r, k) for k, r in enumerate(own[:limit] if limit else own)]
        if not items:
            raise DataError("no held-out questions of the personas' own", field="items")
    return items


def _parallel_items(records: Sequence[QARecord], personas: Sequence[str], limit: int | None) -> list[EvalItem]:
    by_question: dict[str, dict[str, QARecord]] = {}
    for record in records:
        if record.parallel_id:
            by_question.setdefault(record.parallel_id, {})[record.persona] = record
    complete = [pid for pid, answers in by_question.items() if all(p in answers for p in personas)]
    if not complete:
        raise DataError("no parallel questions answered by every persona (rows need a shared parallel_id)",
                        field="parallel_id")
    chosen = complete[:limit] if limit else complete
    return [EvalItem(id=f"{pid}:{p}", persona=p, question=by_question[pid][p].question,
                     reference=by_question[pid][p].answer, context=by_question[pid][p].context, parallel_id=pid)
            for pid in chosen for p in personas]


# --- scoring ------------------------------------------------------------------------------------------------

@dataclass
class Scorer:
    encode: Callable[[Sequence[str]], np.ndarray]
    judge: StyleJudge
    ranges: dict[str, ReferenceRange | None]

    def score(self, items: Sequence[EvalItem], answers: Sequence[ArmAnswer]) -> list[dict[str, Any]]:
        texts = [a.text for a in answers]
        emb_answers = self.encode(texts)
        emb_refs = self.encode([i.reference for i in items])
        probs = self.judge.predict_proba(texts, emb_answers)
        rows = []
        for k, (item, answer) in enumerate(zip(items, answers, strict=True)):
            metrics: dict[str, Any] = text_metrics(answer.text, item.reference, item.persona,
                                                   self.ranges.get(item.persona))
            top = self.judge.classes[int(probs[k].argmax())]
            known = item.persona in self.judge.classes
            metrics["judge_adherence"] = float(probs[k, self.judge.classes.index(item.persona)]) if known else None
            metrics["judge_hit"] = float(top == item.persona) if known else None
            metrics["embedding_cosine"] = float(np.dot(emb_answers[k], emb_refs[k])) if answer.text else 0.0
            metrics["latency_s"] = answer.latency_s
            rows.append({"judge_top": top, **metrics})
        return rows


def build_judge(pack: PersonaPack, config: EvalConfig, evaluated: Sequence[EvalItem],
                test_records: Sequence[QARecord]) -> tuple[Scorer, dict[str, Any]]:
    """Fit (or load) the judge on TRAIN answers, report its held-out accuracy and the Cochrane check."""
    from persona_router.core.home import home_dir
    from persona_router.router.encoder import load_encoder

    train = load_records(config.train_data, pack, split="train")
    encoder = load_encoder()
    judge = train_judge(train, encoder.encode, embedder=encoder.model_id, embedder_fingerprint=encoder.fingerprint,
                        exclude_answers=[i.reference for i in evaluated], cache_dir=home_dir() / "eval" / "judges",
                        seed=config.seed)
    ranges = {p: reference_range([r.answer for r in train if r.persona == p]) for p in pack.names}
    train_answers = {r.answer for r in train}
    heldout = [r for r in test_records if r.answer not in train_answers]
    info = {
        "classes": list(judge.classes), "feature_set": judge.feature_set, "embedder": judge.embedder,
        "train_size": judge.meta.get("train_size"), "cv_accuracy": judge.meta.get("cv_accuracy"),
        "excluded_overlap": judge.meta.get("excluded_overlap", 0),
        "heldout": heldout_report(judge, heldout, encoder.encode),
        "cochrane": cochrane_check(judge, encoder.encode, folder=COCHRANE_DIR, limit=config.cochrane_pairs),
        "reference_ranges": {p: (r.to_json() if r else None) for p, r in ranges.items()},
    }
    return Scorer(encode=encoder.encode, judge=judge, ranges=ranges), info


# --- runs ---------------------------------------------------------------------------------------------------

def _meta(command: str, config: EvalConfig, base: Any) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    return {"command": command, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": config.to_json(), "base_name": base.name, "base_fingerprint": base.fingerprint,
            "device": base.device, "precision": base.precision, "platform": platform.platform(),
            "cpu_count": _cpu_count(), "versions": {"torch": torch.__version__,
                                                    "transformers": transformers.__version__,
                                                    "peft": peft.__version__}}


def _cpu_count() -> int | None:
    import os

    return os.cpu_count()


BATCHED_LATENCY = "batched answers share their queueing time, so latency_s says nothing about either arm"


def compare_all(rows_a: Sequence[dict[str, Any]], rows_b: Sequence[dict[str, Any]], *, stats: StatsConfig,
                labels: tuple[str, str], groups: Sequence[str] | None = None,
                skip: dict[str, str] | None = None) -> list[PairedComparison]:
    """Every metric compared, pairs grouped by ``groups`` (see ``compare_paired``); ``skip`` maps a metric
    left out to the reason the report gives."""
    skip = skip or {}
    return [not_compared(m.name, m.direction, skip[m.name]) if m.name in skip else
            compare_paired(m.name, [r.get(m.name) for r in rows_a], [r.get(m.name) for r in rows_b],
                           direction=m.direction, config=stats, labels=labels, groups=groups) for m in METRICS]


def run_ab(pack: PersonaPack, persona: str, spec_a: str, spec_b: str, config: EvalConfig,
           progress: ProgressFactory) -> dict[str, Any]:
    from persona_router.adapters.base_model import load_base, resolve_base

    pack.get(persona)
    specs = (parse_spec(spec_a, field="a"), parse_spec(spec_b, field="b"))
    test_records = load_records(config.data, pack, split="test")
    items = ab_items(test_records, persona, config.limit)
    # Resolve adapters against the base's fingerprint first: a wrong SPEC fails before minutes of work.
    arms = _resolve_pair(specs, persona=persona, config=config, fingerprint=resolve_base(config.base.base).fingerprint)
    scorer, judge_info = build_judge(pack, config, items, test_records)
    base = load_base(config.base)
    runner: ArmRunner | EngineArmRunner
    if config.engine == "batched":
        runner = EngineArmRunner(base=base, pack=pack, sampling=config.sampling,
                                 max_context_chars=config.max_context_chars, max_batch=config.max_batch)
    else:
        runner = ArmRunner(base=base, pack=pack, sampling=config.sampling, max_context_chars=config.max_context_chars)
    with progress(len(items) * 2, f"eval ab {persona}") as tick:
        answers = runner.run(arms, items, seed=config.seed, progress=tick)
    scores = {a.label: scorer.score(items, answers[a.label]) for a in arms}
    a, b = arms
    skip = {"latency_s": BATCHED_LATENCY} if config.engine == "batched" else None
    comparisons = compare_all(scores[a.label], scores[b.label], stats=config.stats, labels=("A", "B"), skip=skip)
    return {
        "kind": "ab", "meta": _meta("eval ab", config, base), "persona": persona,
        "arms": {"A": a.to_json(), "B": b.to_json()}, "n_items": len(items), "judge": judge_info,
        "metrics": [{"name": m.name, "direction": m.direction, "description": m.description, "legacy": m.legacy}
                    for m in METRICS],
        "comparisons": [c.to_json() for c in comparisons],
        "items": [{"id": item.id, "question": item.question, "reference": item.reference,
                   "A": {**answers[a.label][k].to_json(), "metrics": scores[a.label][k]},
                   "B": {**answers[b.label][k].to_json(), "metrics": scores[b.label][k]}}
                  for k, item in enumerate(items)],
    }


def _resolve_pair(specs: tuple[ArmSpec, ArmSpec], *, persona: str, config: EvalConfig,
                  fingerprint: str) -> list[ResolvedArm]:
    arms = [resolve_arm(s, persona=persona, adapters_root=config.adapters_root, base_fingerprint=fingerprint,
                        label=f"{name}: {s.label}") for name, s in zip(("A", "B"), specs, strict=True)]
    return arms


def run_matrix(pack: PersonaPack, config: EvalConfig, progress: ProgressFactory, *,
               pins: Sequence[str] = (), items_kind: str = "parallel", system_prompt: bool = True) -> dict[str, Any]:
    """Each persona's adapter and the ``prompt`` baseline answer the same questions.

    With ``system_prompt=False`` neither arm sees the persona's system prompt: the baseline is the bare base
    and each adapter must carry its persona's style on its own.
    """
    from persona_router.adapters.base_model import load_base, resolve_base
    from persona_router.adapters.registry import AdapterRegistry

    personas = list(pack.names)
    test_records = load_records(config.data, pack, split="test")
    items = matrix_items(test_records, personas, config.limit, items_kind)
    fingerprint = resolve_base(config.base.base).fingerprint
    registry = AdapterRegistry(config.adapters_root)
    pinned = _pins(pins, personas)
    adapter_arms: dict[str, ResolvedArm] = {}
    missing: dict[str, str] = {}
    for persona in personas:
        spec = pinned.get(persona) or (parse_spec(f"{persona}@latest") if registry.latest(persona) else None)
        if spec is None:
            missing[persona] = f"no trained adapter in {registry.root}"
            continue
        arm = resolve_arm(spec, persona=persona, adapters_root=config.adapters_root,
                          base_fingerprint=fingerprint, label=f"adapter {spec.label}")
        adapter_arms[persona] = arm if system_prompt else replace(arm, without_system_prompt=True)
    scorer, judge_info = build_judge(pack, config, items, test_records)
    base = load_base(config.base)
    baseline = "prompt" if system_prompt else "base"
    prompt_arm = ResolvedArm(label="prompt", spec=parse_spec(baseline))
    # --engine batched: every answer queued at once in the batched engine (eval/batch_generation.py).
    runner = ArmRunner(base=base, pack=pack, sampling=config.sampling, max_context_chars=config.max_context_chars,
                       batch_size=config.max_batch if config.engine == "batched" else 0)
    adapted_items = [i for i in items if i.persona in adapter_arms]
    pairs: list[tuple[ResolvedArm, EvalItem]] = []
    for index, item in enumerate(items):
        pair = [prompt_arm] + ([adapter_arms[item.persona]] if item.persona in adapter_arms else [])
        pairs += [(arm, item) for arm in (pair if index % 2 == 0 else reversed(pair))]
    with progress(len(pairs), "eval matrix") as tick:
        answers = runner.answer_many(pairs, seed=config.seed, progress=tick)
    prompt_answers = [a for (arm, _), a in zip(pairs, answers, strict=True) if arm is prompt_arm]
    adapter_answers = [a for (arm, _), a in zip(pairs, answers, strict=True) if arm is not prompt_arm]
    prompt_scores = scorer.score(items, prompt_answers)
    adapter_scores = scorer.score(adapted_items, adapter_answers)
    conditions = {"prompt": _matrix_condition(items, prompt_scores, scorer.judge.classes)}
    comparisons: list[PairedComparison] = []
    if adapted_items:
        conditions["adapter"] = _matrix_condition(adapted_items, adapter_scores, scorer.judge.classes)
        paired_prompt = [s for i, s in zip(items, prompt_scores, strict=True) if i.persona in adapter_arms]
        # The personas' answers to one parallel question are not independent: that question is the unit.
        groups = [item.parallel_id or item.id for item in adapted_items]
        skip = {"latency_s": BATCHED_LATENCY} if config.engine == "batched" else None
        comparisons = compare_all(adapter_scores, paired_prompt, stats=config.stats, labels=("adapter", "prompt"),
                                  groups=groups, skip=skip)
    return {
        "kind": "matrix", "meta": _meta("eval matrix", config, base), "personas": personas,
        "items_kind": items_kind, "system_prompt": system_prompt, "baseline": baseline, "n_items": len(items),
        "n_questions": len({i.parallel_id or i.id for i in items}), "judge": judge_info,
        "adapters": {p: a.to_json() for p, a in adapter_arms.items()}, "missing_adapters": missing,
        "conditions": conditions,
        "metrics": [{"name": m.name, "direction": m.direction, "description": m.description, "legacy": m.legacy}
                    for m in METRICS],
        "comparisons": [c.to_json() for c in comparisons],
        "items": _matrix_rows(items, prompt_answers, prompt_scores, adapted_items, adapter_answers, adapter_scores),
    }


def _pins(pins: Sequence[str], personas: Sequence[str]) -> dict[str, ArmSpec]:
    from persona_router.core.errors import ConfigError

    out: dict[str, ArmSpec] = {}
    for raw in pins:
        spec = parse_spec(raw, field="use")
        if spec.persona is None:
            raise ConfigError(f"{raw!r}: --use takes NAME@VERSION (e.g. clinician@2), not a baseline or a path",
                              field="use")
        if spec.persona not in personas:
            raise ConfigError(f"{raw!r}: unknown persona; valid personas: {', '.join(personas)}", field="use")
        out[spec.persona] = spec
    return out


def _matrix_condition(items: Sequence[EvalItem], scores: Sequence[dict[str, Any]],
                      classes: Sequence[str]) -> dict[str, Any]:
    truth = [i.persona for i in items]
    predicted = [s["judge_top"] for s in scores]
    adherence = [s["judge_adherence"] for s in scores if s["judge_adherence"] is not None]
    return {"n": len(items), "classes": list(classes), "confusion": confusion(truth, predicted, classes),
            "accuracy": float(np.mean([t == p for t, p in zip(truth, predicted, strict=True)])),
            "mean_adherence": float(np.mean(adherence)) if adherence else None,
            "per_persona_accuracy": {p: float(np.mean([s["judge_top"] == p for i, s in zip(items, scores, strict=True)
                                                       if i.persona == p]))
                                     for p in dict.fromkeys(truth)}}


def _matrix_rows(items: Sequence[EvalItem], prompt_answers: Sequence[ArmAnswer], prompt_scores: Sequence[dict],
                 adapted: Sequence[EvalItem], adapter_answers: Sequence[ArmAnswer],
                 adapter_scores: Sequence[dict]) -> list[dict[str, Any]]:
    by_id = {i.id: (a, s) for i, a, s in zip(adapted, adapter_answers, adapter_scores, strict=True)}
    rows = []
    for item, answer, score in zip(items, prompt_answers, prompt_scores, strict=True):
        row: dict[str, Any] = {"id": item.id, "persona": item.persona, "parallel_id": item.parallel_id,
                               "question": item.question, "prompt": {**answer.to_json(), "metrics": score}}
        if item.id in by_id:
            adapter_answer, adapter_score = by_id[item.id]
            row["adapter"] = {**adapter_answer.to_json(), "metrics": adapter_score}
        rows.append(row)
    return rows
