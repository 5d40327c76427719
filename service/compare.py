"""``POST /v1/compare``: one question answered side by side by two arms, each with its routing decision,
tokens/s and the style judge's verdict.

An arm is a persona (or ``None``: inferred from the question) and an adapter choice (``live``, ``none`` for
the system prompt alone, or a version number), so the view shows a persona's adapter against its prompt,
two personas, or two versions of one persona. Both arms are submitted together, so the engine batches them.

The judge is the evaluation's own (``eval/judge.py``): fitted on the demo train split's reference answers,
never on generated text, loaded (or fitted, a few seconds) on the first compare request and cached.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request, post
from persona_router.core.errors import InvalidRequestError
from persona_router.service.answering import Running, collect_all_or_cancel
from persona_router.service.http_errors import read_body
from persona_router.service.protection import json_body_guard
from persona_router.service.schemas import AnswerRequest, decode_body
from persona_router.service.state import ServiceState, service

log = logging.getLogger(__name__)

ARMS = 2


class CompareArm(msgspec.Struct, forbid_unknown_fields=True):
    persona: str | None = None
    adapter: str | int | None = None


class CompareRequest(msgspec.Struct, forbid_unknown_fields=True):
    question: str
    arms: list[CompareArm]
    context: str | None = None
    max_new_tokens: int | None = None


class Verdict(msgspec.Struct):
    """Whom the judge thinks the answer sounds like, and its probability for the arm's persona."""

    top: str | None
    adherence: float | None
    scores: dict[str, float]
    note: str | None = None


class ArmResult(msgspec.Struct):
    answer: str
    decision: dict[str, Any]
    adapter: dict[str, Any] | None
    completion_tokens: int
    tokens_per_s: float | None  # the decode rate ``/v1/answer`` reports in its timings; None for a single token
    total_ms: float
    finish_reason: str
    judge: Verdict


class CompareResponse(msgspec.Struct):
    question: str
    arms: list[ArmResult]
    judge: dict[str, Any]


class JudgeHolder:
    """The service's style judge, built once on first use (embedding the train answers takes seconds)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._loaded: tuple[Any, Any, dict[str, Any]] | None = None

    async def get(self, state: ServiceState) -> tuple[Any, Any, dict[str, Any]]:
        async with self._lock:
            if self._loaded is None:
                self._loaded = await asyncio.to_thread(_build_judge, state)
            return self._loaded


def _build_judge(state: ServiceState) -> tuple[Any, Any, dict[str, Any]]:
    from persona_router.core.home import home_dir
    from persona_router.core.rows import demo_qa
    from persona_router.eval.judge import train_judge
    from persona_router.router.encoder import load_encoder

    encoder = load_encoder(None)
    records = [r for r in demo_qa("train") if r.persona in state.pack]
    judge = train_judge(records, encoder.encode, embedder=encoder.model_id,
                        embedder_fingerprint=encoder.fingerprint, cache_dir=home_dir() / "eval" / "judges")
    info = {"classes": list(judge.classes), "embedder": judge.embedder, "trained_on": "demo train answers",
            "train_size": len(records)}
    return judge, encoder, info


def verdicts(judge: Any, encoder: Any, answers: list[str], personas: list[str]) -> list[Verdict]:
    classes = list(judge.classes)
    probs = judge.predict_proba(answers, encoder.encode(answers))
    out = []
    for row, persona in zip(probs, personas, strict=True):
        scores = {name: round(float(p), 4) for name, p in zip(classes, row, strict=True)}
        known = persona in scores
        out.append(Verdict(top=classes[int(row.argmax())], adherence=scores[persona] if known else None,
                           scores=scores, note=None if known else f"the judge has no examples of {persona!r}"))
    return out


def arm_result(running: Running, verdict: Verdict) -> ArmResult:
    finished = running.finished
    assert finished is not None
    return ArmResult(answer=finished.answer, decision=running.decision.to_json(), adapter=running.adapter,
                     completion_tokens=finished.usage.completion_tokens,
                     tokens_per_s=finished.timings.get("tokens_per_s"),
                     total_ms=round(finished.timings["total_ms"], 1), finish_reason=finished.finish_reason,
                     judge=verdict)


async def _run_arms(state: ServiceState, body: CompareRequest, receive: Callable[[], Awaitable[Any]]) -> list[Running]:
    started: list[Running] = []
    try:
        for arm in body.arms:
            request = AnswerRequest(question=body.question, persona=arm.persona, context=body.context,
                                    max_new_tokens=body.max_new_tokens, adapter=arm.adapter)
            started.append(await state.answerer.start(request, endpoint="compare"))
        await collect_all_or_cancel(started, receive)  # a client that leaves stops both arms
    finally:
        for running in started:
            running.close(cancel=True)  # a no-op for arms that finished
    return started


@post("/v1/compare", status_code=200, guards=[json_body_guard])
async def compare(request: Request[Any, Any, Any]) -> CompareResponse:
    state = service(request)
    body = decode_body(await read_body(request), CompareRequest)
    if len(body.arms) != ARMS:
        raise InvalidRequestError(f"takes exactly {ARMS} arms, got {len(body.arms)}", field="arms")
    runs = await _run_arms(state, body, request.receive)
    holder: JudgeHolder = request.app.state.judge
    judge, encoder, info = await holder.get(state)
    answers = [run.finished.answer if run.finished else "" for run in runs]
    found = await asyncio.to_thread(verdicts, judge, encoder, answers, [run.decision.persona for run in runs])
    return CompareResponse(question=body.question, arms=[arm_result(r, v) for r, v in zip(runs, found, strict=True)],
                           judge=info)
