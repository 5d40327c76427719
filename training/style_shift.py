"""Did each adapter learn its persona's style, or just the dataset's general shape?

The demo test split holds shared questions (``parallel_id``) that every persona answered in its own register.
For each trained persona P we score, with P's system prompt, every persona Q's held-out answer to the same
questions, once with the base model (adapter disabled) and once with P's adapter. The score is the mean
cross-entropy per answer token, the quantity training minimises, on data that training never saw.

- ``gain[P][Q] = loss_base - loss_adapter``: how much more likely P's adapter makes Q's answers.
- ``specificity[P] = gain[P][P] - mean(gain[P][Q] for Q != P)``: positive when the adapter moved toward P's
  register more than toward the others'. A run that only learned "write a long answer to a question" raises
  every column alike and scores about zero.
- ``own_top1``: the share of questions where P's own answer is the most likely of the persona answers, with
  the base and with the adapter (chance is 1 / number of personas).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from persona_router.adapters.base_model import BaseModelConfig, load_base
from persona_router.adapters.prompts import build_messages
from persona_router.adapters.registry import AdapterRegistry
from persona_router.core.errors import AdapterError
from persona_router.core.pack import PersonaPack
from persona_router.core.records import QARecord
from persona_router.core.rows import demo_qa

log = logging.getLogger(__name__)


def shared_questions(personas: list[str], *, max_questions: int) -> dict[str, dict[str, QARecord]]:
    """``parallel_id -> persona -> record`` for test questions that every persona in ``personas`` answered."""
    by_id: dict[str, dict[str, QARecord]] = defaultdict(dict)
    for record in demo_qa("test"):
        if record.parallel_id and record.persona in personas:
            by_id[record.parallel_id][record.persona] = record
    complete = {pid: rows for pid, rows in sorted(by_id.items()) if len(rows) == len(personas)}
    return dict(list(complete.items())[:max_questions])


def answer_loss(model: Any, tokenizer: Any, messages: list[dict[str, str]], answer: str) -> float:
    """Mean cross-entropy per answer token (end-of-turn included), the prompt masked out as in training."""
    import torch

    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}],
                                             tokenize=True, return_dict=True)["input_ids"]
    ids = torch.tensor([list(full_ids)], device=model.device)
    labels = ids.clone()
    labels[:, : len(prompt_ids)] = -100
    with torch.inference_mode():
        return float(model(input_ids=ids, labels=labels, use_cache=False).loss)


def measure_style_shift(registry: AdapterRegistry, pack: PersonaPack, *, max_questions: int = 10,
                        device: str = "auto") -> dict[str, Any]:
    from peft import PeftModel

    trained = [p.name for p in pack.personas if registry.latest(p.name) is not None]
    if len(trained) < 2:
        raise AdapterError(f"need trained adapters for at least two personas (found: {trained or 'none'}); run "
                           "persona-router train --all first", path=registry.root)
    questions = shared_questions(trained, max_questions=max_questions)
    if not questions:
        raise AdapterError("the demo test split has no question answered by every trained persona")
    manifests = {name: registry.read_manifest(name, registry.resolve(name)) for name in trained}
    base_names = {m.base_model for m in manifests.values()}
    if len(base_names) != 1:
        raise AdapterError(f"the latest adapters were trained on different bases: {sorted(base_names)}")
    base = load_base(BaseModelConfig(base=base_names.pop(), device=device))
    model: Any = None
    for name, manifest in manifests.items():
        registry.verify_compatible(name, manifest.version, base.fingerprint)
        path = str(registry.path(name, manifest.version))
        if model is None:
            model = PeftModel.from_pretrained(base.model, path, adapter_name=name)
        else:
            model.load_adapter(path, adapter_name=name)
    model.eval()
    base_loss: dict[str, dict[str, float]] = {}
    adapter_loss: dict[str, dict[str, float]] = {}
    top1 = {"base": {}, "adapter": {}}  # type: dict[str, dict[str, float]]
    for name in trained:
        prompt = pack.get(name).system_prompt
        model.set_adapter(name)
        scores: dict[str, dict[str, list[float]]] = {"base": defaultdict(list), "adapter": defaultdict(list)}
        for rows in questions.values():
            messages = build_messages(rows[name].question, system_prompt=prompt)
            for target in trained:
                with model.disable_adapter():
                    scores["base"][target].append(answer_loss(model, base.tokenizer, messages, rows[target].answer))
                scores["adapter"][target].append(answer_loss(model, base.tokenizer, messages, rows[target].answer))
        base_loss[name] = {t: _mean(v) for t, v in scores["base"].items()}
        adapter_loss[name] = {t: _mean(v) for t, v in scores["adapter"].items()}
        for arm in ("base", "adapter"):
            wins = [min(trained, key=lambda t, i=i: scores[arm][t][i]) == name for i in range(len(questions))]  # type: ignore[misc]
            top1[arm][name] = round(sum(wins) / len(wins), 3)
        log.info("%s: own-answer loss %.3f -> %.3f", name, base_loss[name][name], adapter_loss[name][name])
    return _report(trained, questions, manifests, base_loss, adapter_loss, top1)


def _report(trained: list[str], questions: dict[str, Any], manifests: dict[str, Any],
            base_loss: dict[str, dict[str, float]], adapter_loss: dict[str, dict[str, float]],
            top1: dict[str, dict[str, float]]) -> dict[str, Any]:
    gain = {p: {q: round(base_loss[p][q] - adapter_loss[p][q], 4) for q in trained} for p in trained}
    specificity = {p: round(gain[p][p] - _mean([gain[p][q] for q in trained if q != p]), 4) for p in trained}
    return {
        "personas": trained,
        "questions": list(questions),
        "versions": {p: m.version for p, m in manifests.items()},
        "base_loss": base_loss,
        "adapter_loss": adapter_loss,
        "gain": gain,
        "specificity": specificity,
        "own_top1": top1,
        "chance_top1": round(1 / len(trained), 3),
    }


def format_report(report: dict[str, Any]) -> str:
    names = report["personas"]
    width = max(len(n) for n in names) + 2
    lines = [f"answer-token loss gain (base - adapter) on {len(report['questions'])} shared held-out questions;",
             "rows: adapter + its system prompt; columns: whose answer is scored",
             " " * width + "".join(f"{n[:12]:>13}" for n in names) + "  specificity  own-top1 base->adapter"]
    for p in names:
        cells = "".join(f"{report['gain'][p][q]:>13.3f}" for q in names)
        lines.append(f"{p:<{width}}{cells}  {report['specificity'][p]:>11.3f}  "
                     f"{report['own_top1']['base'][p]:.2f} -> {report['own_top1']['adapter'][p]:.2f}")
    lines.append(f"(own-top1 chance level: {report['chance_top1']:.2f})")
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else float("nan")
