"""Answer evaluation items with each arm: one base model in memory, adapters added to it by name.

Every arm answers every item with the same decoding settings and the same per-item seed, so two arms
differ only in what the arm is (adapter or prompt). Adapters are applied per call through
``generate(adapter_names=[...])``, never by switching a global active adapter; baselines on a model that
carries adapters use PEFT's ``"__base__"`` name (no LoRA delta). Arms answer each item in alternating order
so that warm-up and cache effects do not always favour the same arm's latency.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_router.adapters.base_model import LoadedBase
from persona_router.adapters.generation import SamplingConfig, generate_one
from persona_router.adapters.prompts import build_messages
from persona_router.core.errors import AdapterError, ConfigError
from persona_router.core.pack import PersonaPack
from persona_router.core.records import QARecord
from persona_router.eval.specs import ArmSpec

log = logging.getLogger(__name__)

PEFT_BASE = "__base__"
DEFAULT_MAX_CONTEXT_CHARS = 2000  # the original notebook's evaluation cut


@dataclass(frozen=True)
class EvalItem:
    """One question to answer, the persona expected to be answering it, and the reference answer."""

    id: str
    persona: str
    question: str
    reference: str
    context: str | None = None
    parallel_id: str | None = None

    @classmethod
    def from_record(cls, record: QARecord, index: int) -> EvalItem:
        return cls(id=record.id or f"{record.persona}-{index:04d}", persona=record.persona, question=record.question,
                   reference=record.answer, context=record.context, parallel_id=record.parallel_id)


@dataclass(frozen=True)
class ResolvedArm:
    """An arm ready to run: ``adapter_path`` for adapters; ``system_prompt`` says which prompt it uses."""

    label: str
    spec: ArmSpec
    adapter_path: Path | None = None
    adapter_version: int | None = None
    adapter_persona: str | None = None
    trained_system_prompt: str | None = None  # the prompt the adapter was trained with (manifest)
    without_system_prompt: bool = False  # answer with no persona prompt: does the adapter carry the style alone?

    @property
    def uses_system_prompt(self) -> bool:
        return self.spec.kind != "base" and not self.without_system_prompt

    def system_prompt(self, pack: PersonaPack, persona: str) -> str | None:
        if not self.uses_system_prompt:
            return None
        return self.trained_system_prompt or pack.get(persona).system_prompt

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "spec": self.spec.raw, "kind": self.spec.kind,
                "adapter_path": str(self.adapter_path) if self.adapter_path else None,
                "adapter_persona": self.adapter_persona, "adapter_version": self.adapter_version,
                "system_prompt": "none" if not self.uses_system_prompt else
                ("as trained (manifest)" if self.trained_system_prompt else "persona's pack prompt")}


@dataclass(frozen=True)
class ArmAnswer:
    item_id: str
    arm: str
    text: str
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    seed: int | None

    def to_json(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "arm": self.arm, "text": self.text, "latency_s": self.latency_s,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "seed": self.seed}


def resolve_arm(spec: ArmSpec, *, persona: str, adapters_root: Path | None, base_fingerprint: str,
                label: str | None = None) -> ResolvedArm:
    """Locate an arm's adapter (registry or folder) and refuse one trained on another base."""
    from persona_router.adapters.manifest import read_manifest_file
    from persona_router.adapters.registry import AdapterRegistry, check_fingerprint

    if not spec.is_adapter:
        return ResolvedArm(label=label or spec.label, spec=spec)
    if spec.path is not None:
        folder = spec.path
    else:
        assert spec.persona is not None and spec.version is not None
        registry = AdapterRegistry(adapters_root)
        version = registry.resolve(spec.persona, spec.version)
        folder = registry.path(spec.persona, version)
    manifest = read_manifest_file(folder)
    check_fingerprint(manifest, base_fingerprint, where=folder)
    if manifest.persona != persona:
        log.warning("arm %s is persona %r's adapter, evaluated on persona %r's items", spec.raw, manifest.persona,
                    persona)
    prompt = manifest.extra.get("system_prompt")
    return ResolvedArm(label=label or spec.label, spec=spec, adapter_path=folder, adapter_version=manifest.version,
                       adapter_persona=manifest.persona,
                       trained_system_prompt=prompt if isinstance(prompt, str) else None)


def item_seed(seed: int, item_id: str) -> int:
    """The per-item sampling seed shared by every arm: stable across runs, independent of item order."""
    digest = hashlib.sha256(f"{seed}\x00{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass
class ArmRunner:
    """Holds the base model and the adapters loaded onto it; answers (arm, item) pairs."""

    base: LoadedBase
    pack: PersonaPack
    sampling: SamplingConfig
    max_context_chars: int = DEFAULT_MAX_CONTEXT_CHARS
    batch_size: int = 0  # > 0: answer through the batched engine, this many sequences per forward pass
    _model: Any = None
    _adapters: dict[str, str] = field(default_factory=dict)  # adapter folder -> PEFT adapter name

    def __post_init__(self) -> None:
        if self.max_context_chars < 0:
            raise ConfigError(f"{self.max_context_chars} must be >= 0", field="max_context_chars")
        self._model = self.base.model

    def add(self, arm: ResolvedArm) -> None:
        """Load an arm's adapter onto the shared base (once per folder)."""
        if arm.adapter_path is None or str(arm.adapter_path) in self._adapters:
            return
        name = _adapter_name(arm.label, taken=set(self._adapters.values()))
        try:
            from peft import PeftModel
        except ImportError as exc:
            raise AdapterError("adapter arms need peft: pip install peft") from exc
        try:
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(arm.adapter_path), adapter_name=name)
            else:
                self._model = PeftModel.from_pretrained(self.base.model, str(arm.adapter_path), adapter_name=name)
                self._model.eval()
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise AdapterError(f"cannot load adapter: {exc}", path=arm.adapter_path) from exc
        self._adapters[str(arm.adapter_path)] = name
        log.info("loaded adapter %s as %r", arm.adapter_path, name)

    def _adapter_for(self, arm: ResolvedArm) -> str | None:
        if arm.adapter_path is not None:
            return self._adapters[str(arm.adapter_path)]
        return PEFT_BASE if self._adapters else None

    def messages(self, arm: ResolvedArm, item: EvalItem) -> list[dict[str, str]]:
        context = item.context[: self.max_context_chars] if item.context and self.max_context_chars else None
        return build_messages(item.question, system_prompt=arm.system_prompt(self.pack, item.persona), context=context)

    def answer(self, arm: ResolvedArm, item: EvalItem, *, seed: int) -> ArmAnswer:
        self.add(arm)
        sampling = self._item_sampling(item, seed)
        per_item = sampling.seed
        start = time.perf_counter()
        completion = generate_one(self._model, self.base.tokenizer, self.messages(arm, item), sampling,
                                  adapter_name=self._adapter_for(arm))
        latency = time.perf_counter() - start
        return ArmAnswer(item_id=item.id, arm=arm.label, text=completion.text, latency_s=latency,
                         prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
                         seed=per_item)

    def answer_many(self, pairs: Sequence[tuple[ResolvedArm, EvalItem]], *, seed: int,
                    progress: Callable[[int], None] | None = None) -> list[ArmAnswer]:
        """Answer (arm, item) pairs, in order: one at a time, or all through the batched engine."""
        if self.batch_size <= 0:
            out = []
            for arm, item in pairs:
                out.append(self.answer(arm, item, seed=seed))
                if progress is not None:
                    progress(1)
            return out
        from persona_router.adapters.prompts import prompt_ids
        from persona_router.eval.batch_generation import PromptJob, generate_batched

        jobs = [PromptJob(tuple(prompt_ids(self.base.tokenizer, self.messages(arm, item))), arm.adapter_path,
                          self._item_sampling(item, seed)) for arm, item in pairs]
        done = generate_batched(self.base, jobs, max_batch=self.batch_size, progress=progress)
        return [ArmAnswer(item_id=item.id, arm=arm.label, text=d.completion.text, latency_s=d.latency_s,
                          prompt_tokens=d.completion.prompt_tokens, completion_tokens=d.completion.completion_tokens,
                          seed=job.sampling.seed)
                for (arm, item), job, d in zip(pairs, jobs, done, strict=True)]

    def _item_sampling(self, item: EvalItem, seed: int) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.sampling.max_new_tokens, temperature=self.sampling.temperature,
                              top_p=self.sampling.top_p, seed=item_seed(seed, item.id))

    def run(self, arms: Sequence[ResolvedArm], items: Sequence[EvalItem], *, seed: int,
            progress: Callable[[int], None] | None = None) -> dict[str, list[ArmAnswer]]:
        """Every arm answers every item; returns answers per arm label, in item order."""
        labels = [a.label for a in arms]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"arm labels must differ, got {labels}", field="arms")
        if self.batch_size <= 0:
            for arm in arms:
                self.add(arm)
        pairs = [(arm, item) for index, item in enumerate(items)
                 for arm in (list(arms) if index % 2 == 0 else list(reversed(arms)))]
        out: dict[str, list[ArmAnswer]] = {a.label: [] for a in arms}
        for (arm, _), answer in zip(pairs, self.answer_many(pairs, seed=seed, progress=progress), strict=True):
            out[arm.label].append(answer)
        return out


def _adapter_name(label: str, *, taken: set[str]) -> str:
    # PEFT names become module-dict keys: no dots, and not the reserved base name.
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", label).strip("_")[:48] or "adapter"
    name, n = stem, 2
    while name in taken or name == PEFT_BASE:
        name, n = f"{stem}_{n}", n + 1
    return name
