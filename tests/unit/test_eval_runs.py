"""Arms on the tiny random model: same seeds for every arm, determinism, adapters applied per call, and an
end-to-end ``run_ab`` / ``run_matrix`` that writes report.json, report.md and PNG plots."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from persona_router.adapters.base_model import BaseModelConfig, load_base
from persona_router.adapters.generation import SamplingConfig
from persona_router.core.errors import AdapterIncompatibleError
from persona_router.core.pack import load_pack
from persona_router.eval.arms import ArmRunner, EvalItem, ResolvedArm, item_seed, resolve_arm
from persona_router.eval.specs import parse_spec

ITEMS = [EvalItem(id=f"i{k}", persona="student", question=q, reference="the sky is blue because light scatters")
         for k, q in enumerate(["why is the sky blue?", "what is code?", "explain the heart"])]


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> Any:
    return load_base(BaseModelConfig(base=str(tiny_model_dir), device="cpu"))


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory: pytest.TempPathFactory, base: Any) -> Path:
    """A registry with one non-trivial student adapter (random LoRA B) trained 'on' the tiny base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from persona_router.adapters.manifest import AdapterManifest, DatasetInfo, TrainMetrics, write_manifest
    from persona_router.adapters.registry import AdapterRegistry

    root = tmp_path_factory.mktemp("adapters")
    registry = AdapterRegistry(root)
    for version in (1, 2):
        staged = registry.staging_dir("student")
        torch.manual_seed(version)
        fresh = load_base(BaseModelConfig(base=str(base.resolved.folder), device="cpu")).model
        peft_model = get_peft_model(fresh, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      init_lora_weights=False))
        peft_model.save_pretrained(str(staged))
        manifest = AdapterManifest(
            persona="student", version=version, base_model=base.name, base_fingerprint=base.fingerprint,
            dataset=DatasetInfo(source="test", sha256="0", rows_train=1, rows_eval=1, eval_source="test"),
            hyperparameters={}, metrics=TrainMetrics(None, None, None, 0, 0.0, 0, 0.0, 0.0, 0.0, "none"),
            device="cpu", precision="fp32", library_versions={}, extra={"system_prompt": "Trained prompt."})
        write_manifest(staged, manifest)
        registry.publish("student", staged)
    return root


def test_item_seed_is_shared_and_order_free() -> None:
    assert item_seed(0, "a") == item_seed(0, "a") != item_seed(1, "a")
    assert item_seed(0, "a") != item_seed(0, "b")


def test_baselines_prompts_and_determinism(base: Any) -> None:
    pack = load_pack("demo")
    runner = ArmRunner(base=base, pack=pack, sampling=SamplingConfig(max_new_tokens=6, temperature=0.9, top_p=0.95))
    arms = [ResolvedArm("prompt", parse_spec("prompt")), ResolvedArm("base", parse_spec("base"))]
    assert runner.messages(arms[0], ITEMS[0])[0] == {"role": "system", "content": pack.get("student").system_prompt}
    assert [m["role"] for m in runner.messages(arms[1], ITEMS[0])] == ["user"]
    first = runner.run(arms, ITEMS, seed=3)
    second = runner.run(arms, ITEMS, seed=3)
    assert [a.text for a in first["prompt"]] == [a.text for a in second["prompt"]]
    assert [a.seed for a in first["prompt"]] == [a.seed for a in first["base"]]  # same seed in both arms
    assert all(a.latency_s > 0 and a.completion_tokens >= 1 for a in first["base"])


def test_adapter_arm_resolves_and_base_rows_stay_base(base: Any, registry_root: Path) -> None:
    pack = load_pack("demo")
    greedy = SamplingConfig(max_new_tokens=5)
    prompt = ResolvedArm("prompt", parse_spec("prompt"))
    plain = ArmRunner(base=load_base(BaseModelConfig(base=str(base.resolved.folder), device="cpu")), pack=pack,
                      sampling=greedy)
    alone = plain.run([prompt], ITEMS, seed=0)["prompt"]
    latest = resolve_arm(parse_spec("student@latest"), persona="student", adapters_root=registry_root,
                         base_fingerprint=base.fingerprint, label="v2")
    first = resolve_arm(parse_spec("student@1"), persona="student", adapters_root=registry_root,
                        base_fingerprint=base.fingerprint, label="v1")
    assert latest.adapter_version == 2 and latest.system_prompt(pack, "student") == "Trained prompt."

    def fresh_runner() -> ArmRunner:
        return ArmRunner(base=load_base(BaseModelConfig(base=str(base.resolved.folder), device="cpu")), pack=pack,
                         sampling=greedy)

    v1_alone = fresh_runner().run([first], ITEMS, seed=0)["v1"]
    together = fresh_runner().run([first, latest, prompt], ITEMS, seed=0)
    # Adapters apply per call (adapter_names), so loading another one changes nothing for v1 ...
    assert [a.text for a in together["v1"]] == [a.text for a in v1_alone]
    # ... the prompt arm runs as PEFT "__base__", identical to the model without adapters ...
    assert [a.text for a in together["prompt"]] == [a.text for a in alone]
    # ... and the adapter really changes the output.
    assert [a.text for a in together["v1"]] != [a.text for a in alone]
    with pytest.raises(AdapterIncompatibleError):
        resolve_arm(parse_spec("student@1"), persona="student", adapters_root=registry_root,
                    base_fingerprint="sha256:other")


@contextlib.contextmanager
def no_progress(total: int, description: str) -> Iterator[Any]:
    yield lambda n: None


def fake_scorer(pack: Any, config: Any, evaluated: Any, test_records: Any) -> Any:
    from persona_router.core.rows import demo_qa
    from persona_router.eval.judge import fit_judge
    from persona_router.eval.metrics import reference_range
    from persona_router.eval.pipeline import Scorer

    def embed(texts: Any) -> np.ndarray:
        out = np.zeros((len(texts), 16))
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, sum(map(ord, word)) % 16] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    per_persona: dict[str, int] = {}
    train = []
    for record in demo_qa("train"):  # a dozen answers per persona keep the fit fast
        if per_persona.setdefault(record.persona, 0) < 12:
            per_persona[record.persona] += 1
            train.append(record)
    texts = [r.answer for r in train]
    judge = fit_judge(texts, [r.persona for r in train], embed(texts), embedder="fake", feature_set="embedding")
    ranges = {p: reference_range([r.answer for r in train if r.persona == p]) for p in pack.names}
    info = {"classes": list(judge.classes), "feature_set": judge.feature_set, "embedder": "fake",
            "train_size": len(texts), "cv_accuracy": {}, "excluded_overlap": 0,
            "heldout": {"status": "ok", "n": 2, "accuracy": 0.5, "classes": list(judge.classes),
                        "confusion": [[1] * len(judge.classes)] * len(judge.classes)},
            "cochrane": {"status": "skipped", "reason": "test"},
            "reference_ranges": {p: (r.to_json() if r else None) for p, r in ranges.items()}}
    return Scorer(encode=embed, judge=judge, ranges=ranges), info


def test_run_ab_and_matrix_write_reports(base: Any, registry_root: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from persona_router.eval import pipeline
    from persona_router.eval.report import write_report

    monkeypatch.setattr(pipeline, "build_judge", fake_scorer)
    config = pipeline.EvalConfig(base=BaseModelConfig(base=str(base.resolved.folder), device="cpu"),
                                 sampling=SamplingConfig(max_new_tokens=4), adapters_root=registry_root, limit=2,
                                 stats=pipeline.StatsConfig(n_boot=200))
    pack = load_pack("demo")
    report = pipeline.run_ab(pack, "student", "student@2", "prompt", config, no_progress)
    assert report["n_items"] == 2 and len(report["comparisons"]) == len(report["metrics"])
    write_report(report, tmp_path / "ab")
    saved = json.loads((tmp_path / "ab" / "report.json").read_text())
    assert {"paired_differences.png", "confusion_judge_heldout.png", "report.md"} <= set(saved["files"])
    assert (tmp_path / "ab" / "paired_differences.png").read_bytes()[:4] == b"\x89PNG"
    assert "Legacy metrics" in (tmp_path / "ab" / "report.md").read_text()

    matrix = pipeline.run_matrix(pack, config, no_progress)
    assert matrix["n_questions"] == 2 and set(matrix["adapters"]) == {"student"}
    assert set(matrix["missing_adapters"]) == set(pack.names) - {"student"}
    assert matrix["conditions"]["prompt"]["n"] == 2 * len(pack.names)
    assert matrix["conditions"]["adapter"]["n"] == 2
    latency = {c["metric"]: c for c in matrix["comparisons"]}["latency_s"]
    assert latency["n"] == latency["n_items"] == 2  # one question each: two units
    write_report(matrix, tmp_path / "matrix")
    assert (tmp_path / "matrix" / "confusion_prompt.png").is_file()
    assert (tmp_path / "matrix" / "confusion_adapter.png").is_file()
    assert "2 questions, 10 items, 5 personas" in (tmp_path / "matrix" / "report.md").read_text()
    batched = pipeline.run_matrix(pack, replace(config, engine="batched"), no_progress)
    latency = {c["metric"]: c for c in batched["comparisons"]}["latency_s"]
    assert latency["n"] == 0 and "not compared (batched answers share their queueing time" in latency["verdict"]


def test_batched_engine_answers_equal_sequential(base: Any, registry_root: Path) -> None:
    """``eval ab --engine batched``: the same greedy answers as one generate call per answer (float32 CPU)."""
    from persona_router.eval.batched import EngineArmRunner

    pack = load_pack("demo")
    greedy = SamplingConfig(max_new_tokens=6)
    arms = [resolve_arm(parse_spec("student@1"), persona="student", adapters_root=registry_root,
                        base_fingerprint=base.fingerprint, label="v1"),
            resolve_arm(parse_spec("student@2"), persona="student", adapters_root=registry_root,
                        base_fingerprint=base.fingerprint, label="v2"),
            ResolvedArm("prompt", parse_spec("prompt"))]
    items = [*ITEMS, EvalItem(id="ctx", persona="student", question="summarise", reference="r",
                              context="a long technical paragraph " * 20)]
    sequential = ArmRunner(base=load_base(BaseModelConfig(base=str(base.resolved.folder), device="cpu")),
                           pack=pack, sampling=greedy, max_context_chars=200).run(arms, items, seed=0)
    ticks: list[int] = []
    batched = EngineArmRunner(base=base, pack=pack, sampling=greedy, max_context_chars=200,
                              max_batch=4).run(arms, items, seed=0, progress=ticks.append)
    assert len(ticks) == len(arms) * len(items)
    for arm in arms:
        assert [a.item_id for a in batched[arm.label]] == [i.id for i in items]
        assert [a.text for a in batched[arm.label]] == [a.text for a in sequential[arm.label]]
        assert [a.prompt_tokens for a in batched[arm.label]] == [a.prompt_tokens for a in sequential[arm.label]]
    assert [a.text for a in batched["v1"]] != [a.text for a in batched["prompt"]]  # the adapter really applied


def test_batched_engine_takes_adapters_above_the_engine_default_rank(base: Any, tmp_path: Path) -> None:
    """``eval ab --engine batched`` sizes the engine's max_rank from the adapters (the engine's default, 16,
    refused a rank-32 adapter), with the helper ``eval matrix``'s batched path uses."""
    import torch
    from peft import LoraConfig, get_peft_model
    from persona_router.eval.batch_generation import engine_max_rank
    from persona_router.eval.batched import EngineArmRunner

    torch.manual_seed(3)
    fresh = load_base(BaseModelConfig(base=str(base.resolved.folder), device="cpu")).model
    folder = tmp_path / "rank32"
    get_peft_model(fresh, LoraConfig(r=32, lora_alpha=32, target_modules="all-linear",
                                     init_lora_weights=False)).save_pretrained(str(folder))
    assert engine_max_rank([folder]) == 32 and engine_max_rank([]) == 8
    greedy = SamplingConfig(max_new_tokens=3)
    arms = [ResolvedArm("r32", parse_spec(str(folder)), adapter_path=folder),
            ResolvedArm("prompt", parse_spec("prompt"))]
    answers = EngineArmRunner(base=base, pack=load_pack("demo"), sampling=greedy, max_batch=2).run(
        arms, ITEMS[:1], seed=0)
    one_by_one = ArmRunner(base=load_base(BaseModelConfig(base=str(base.resolved.folder), device="cpu")),
                           pack=load_pack("demo"), sampling=greedy).run(arms, ITEMS[:1], seed=0)
    assert [a.text for a in answers["r32"]] == [a.text for a in one_by_one["r32"]]


def test_batched_engine_answers_equal_one_at_a_time(base: Any, registry_root: Path) -> None:
    """The batched path (many answers per forward pass, mixed adapters) gives the greedy texts of generate()."""
    pack = load_pack("demo")
    greedy = SamplingConfig(max_new_tokens=6)
    arms = [resolve_arm(parse_spec(f"student@{v}"), persona="student", adapters_root=registry_root,
                        base_fingerprint=base.fingerprint, label=f"v{v}") for v in (1, 2)]
    arms.append(ResolvedArm("prompt", parse_spec("prompt")))
    arms.append(replace(arms[0], label="v1-alone", without_system_prompt=True))

    def runner(batch_size: int) -> ArmRunner:
        return ArmRunner(base=load_base(BaseModelConfig(base=str(base.resolved.folder), device="cpu")), pack=pack,
                         sampling=greedy, batch_size=batch_size)

    one_by_one = runner(0).run(arms, ITEMS, seed=0)
    batched = runner(3).run(arms, ITEMS, seed=0)
    for arm in arms:
        assert [a.text for a in batched[arm.label]] == [a.text for a in one_by_one[arm.label]], arm.label
        assert [a.completion_tokens for a in batched[arm.label]] == [a.completion_tokens
                                                                     for a in one_by_one[arm.label]]
    assert [a.text for a in batched["v1-alone"]] != [a.text for a in batched["v1"]]  # the prompt matters
    assert runner(0).messages(arms[3], ITEMS[0])[0]["role"] == "user"  # no persona system prompt


def test_matrix_items_parallel_own_and_all() -> None:
    from persona_router.core.errors import ConfigError
    from persona_router.core.rows import demo_qa
    from persona_router.eval.pipeline import matrix_items

    records = demo_qa("test")
    personas = load_pack("demo").names
    parallel = matrix_items(records, personas, None, "parallel")
    own = matrix_items(records, personas, None, "own")
    assert len(parallel) == 10 * len(personas) and all(i.parallel_id for i in parallel)
    assert len(own) == 10 * len(personas) and not any(i.parallel_id for i in own)
    assert {i.persona for i in own} == set(personas)
    assert [i.id for i in matrix_items(records, personas, None, "all")] == [i.id for i in parallel + own]
    assert len({i.id for i in parallel + own}) == len(parallel) + len(own)
    with pytest.raises(ConfigError, match="items"):
        matrix_items(records, personas, None, "every")


def test_matrix_without_system_prompt_uses_the_bare_base(base: Any, registry_root: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from persona_router.eval import pipeline

    monkeypatch.setattr(pipeline, "build_judge", fake_scorer)
    config = pipeline.EvalConfig(base=BaseModelConfig(base=str(base.resolved.folder), device="cpu"),
                                 sampling=SamplingConfig(max_new_tokens=3), adapters_root=registry_root, limit=1,
                                 stats=pipeline.StatsConfig(n_boot=100), engine="batched", max_batch=8)
    pack = load_pack("demo")
    matrix = pipeline.run_matrix(pack, config, no_progress, items_kind="all", system_prompt=False)
    assert matrix["baseline"] == "base" and matrix["system_prompt"] is False
    assert matrix["n_items"] == 2 * len(pack.names)  # one parallel + one own question per persona
    assert matrix["adapters"]["student"]["system_prompt"] == "none"
