"""POST /eval: the base and up to eight adapters answer the same rows greedily, in mixed batches, scored.

Every (adapter, row) pair becomes one engine job; all of them are submitted before any is awaited, so
the worker's continuous batching runs base and adapter rows side by side in each forward pass. Each
adapter sees the row's prompt part rendered with its own template (what ``/generate`` does without
``raw``), and answers with ``max_new_tokens`` = the longest reference + ``MARGIN_TOKENS``, capped by
the server. The scores come from ``trainer.metrics.generation_metrics``, the scorer of
``python -m trainer eval``. A training job with validation rows ends with this same request, sent by
the job runner over loopback (``service.jobs.evaluation``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service.errors import ApiError
from service.gateway import (
    EngineClient,
    ModelLimits,
    Submission,
    fetch_missing,
    prepare_job,
    raise_for_event,
    resolve_target,
    template_of,
    unless_disconnected,
)
from service.jobs.datasets import read_dataset_rows
from service.jobs.validate import check_rows
from service.settings import Settings
from service.wire import Event, Job, ResolvedTarget, SamplingParams

MAX_ADAPTERS = 8
MARGIN_TOKENS = 16  # room past the longest reference, so an answer that overruns it shows as such
BASE_KEY = "base"  # how the base (null in ``adapters``) is named in ``metrics`` and row outputs


class EvalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapters: list[str | None] = Field(
        min_length=1, max_length=MAX_ADAPTERS, description="adapter names; null is the base model"
    )
    data: list[Any] | None = Field(None, description="rows in any training format (validated like /train)")
    dataset: str | None = Field(None, description="an uploaded dataset's id (POST /datasets)")


def key_of(adapter: str | None) -> str:
    return BASE_KEY if adapter is None else adapter


def _check_adapters(settings: Settings, adapters: list[str | None]) -> dict[str, ResolvedTarget | None]:
    """Each adapter (name, or name@<version id prefix>) resolved once, by its key: its prompts are
    rendered with that version's template and answered by that version's weights."""
    seen: dict[str, ResolvedTarget | None] = {}
    for i, name in enumerate(adapters):
        param = f"adapters[{i}]"
        target = None
        if name is not None:
            target = resolve_target(settings.adapter_dir, name, param)
        key = key_of(name)
        if key in seen:
            raise ApiError(
                422,
                "invalid_request",
                f"adapters names {key!r} twice (null, the base, is reported as {BASE_KEY!r})",
                param,
            )
        seen[key] = target
    return seen


def _load_rows(settings: Settings, req: EvalRequest) -> tuple[list[Any], str]:
    """The request's rows and the name their 422s use (``data`` or ``dataset``)."""
    if (req.data is None) == (req.dataset is None):
        raise ApiError(
            422, "invalid_request", "give exactly one of 'data' (rows) or 'dataset' (an id)", "data"
        )
    if req.data is not None:
        check_rows(req.data, "data")
        return req.data, "data"
    return read_dataset_rows(settings, req.dataset), "dataset"


def _prompts(
    rows: list[Any], param: str, targets: dict[str, ResolvedTarget | None], base_template: Any = None
):
    """[(row index, reference, {adapter key: rendered prompt}, rejected answer or None)] for the rows that
    have a prompt part. A preference row's reference is its chosen answer."""
    from trainer.data import parse_any_row
    from trainer.errors import TrainerError

    templates = {key: template_of(target, base=base_template) for key, target in targets.items()}
    out = []
    for i, row in enumerate(rows):
        where = f"{param}[{i}]"
        try:
            parsed = {key: parse_any_row(row, where, tpl) for key, tpl in templates.items()}
        except TrainerError as exc:  # a dataset is checked at upload; a template can still refuse a row
            raise ApiError(422, "invalid_row", str(exc), where) from None
        first = next(iter(parsed.values()))
        if first.prompt_text is None:  # plain text: nothing to answer
            continue
        rejected = getattr(first, "rejected", None)
        out.append(
            (i, first.reference or "", {key: ex.prompt_text or "" for key, ex in parsed.items()}, rejected)
        )
    if not out:
        raise ApiError(
            422,
            "invalid_data",
            f"no row of '{param}' has a prompt and an answer (plain 'text' rows cannot be evaluated)",
            param,
        )
    return out


def eval_max_new_tokens(limits: ModelLimits, references: list[str], cap: int) -> int:
    """Enough for the longest reference and its EOS, plus a margin; never above the server's cap."""
    longest = max(len(limits.tokenizer.encode(r)) for r in references)
    return min(cap, longest + 1 + MARGIN_TOKENS)


def _prepare_jobs(
    settings: Settings,
    limits: ModelLimits,
    items: list,
    targets: dict[str, ResolvedTarget | None],
    max_in_flight: int,
) -> tuple[list[Job], int]:
    """One validated engine job per (row, adapter), row-major, and the max_new_tokens they share."""
    adapters = list(targets)
    total = len(items) * len(adapters)
    if total > max_in_flight:
        raise ApiError(
            422,
            "too_many_rows",
            f"{len(items)} rows x {len(adapters)} adapters is {total} answers; this server holds at most "
            f"{max_in_flight} requests in flight: send fewer rows or adapters per request",
            "data",
        )
    answers = [ref for _, ref, _, _ in items] + [rej for *_, rej in items if rej is not None]
    max_new = eval_max_new_tokens(limits, answers, settings.max_new_tokens_cap)
    greedy = SamplingParams(max_new_tokens=max_new, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=[])
    jobs = [
        prepare_job(
            prompt_text=prompts[key],
            target=targets[key],
            params=greedy,
            stream=False,
            limits=limits,
            max_new_tokens_cap=settings.max_new_tokens_cap,
            request_timeout=settings.request_timeout,
        )
        for _, _, prompts, _ in items
        for key in adapters
    ]
    return jobs, max_new


async def _answer_all(client: EngineClient, jobs: list[Job], request: Request) -> list[Event]:
    """Queue every job, then wait for all: queued together, they run in the same mixed batches."""
    subs: list[Submission] = []
    waits: list[asyncio.Future] = []
    try:
        for job in jobs:
            client.reserve(job)
            subs.append(client.submit(job, request))
        waits = [asyncio.ensure_future(s.final(raise_for_event)) for s in subs]
        return await unless_disconnected(asyncio.gather(*waits), request)
    finally:
        for w in waits:  # one failed: the others are not awaited any more
            w.cancel()
        for s in subs:
            s.close()  # an unfinished job is dropped by the worker


@dataclass(frozen=True)
class EvalContext:
    """What the handler shares, set on ``app.state.eval`` by ``register_eval_routes``."""

    settings: Settings
    client: EngineClient
    limits: ModelLimits


def _context(request: Request) -> EvalContext:
    return request.app.state.eval


def register_eval_routes(app: FastAPI, settings: Settings, client: EngineClient, limits: ModelLimits) -> None:
    app.state.eval = EvalContext(settings, client, limits)
    app.add_api_route(
        "/eval",
        evaluate,
        methods=["POST"],
        tags=["generation"],
        responses={400: {}, 404: {}, 422: {}, 503: {}, 504: {}},
    )


async def evaluate(body: EvalRequest, request: Request) -> dict[str, Any]:
    """Greedy answers of each adapter (null: the base) to every row, scored against the rows' answers."""
    from trainer.metrics import generation_metrics

    ctx = _context(request)
    settings, client, limits = ctx.settings, ctx.client, ctx.limits
    await fetch_missing(request, [(name, f"adapters[{i}]") for i, name in enumerate(body.adapters)])
    targets = _check_adapters(settings, body.adapters)
    rows, param = await run_in_threadpool(_load_rows, settings, body)
    items = await run_in_threadpool(_prompts, rows, param, targets, limits.template)
    jobs, max_new = await run_in_threadpool(
        _prepare_jobs, settings, limits, items, targets, client.max_in_flight
    )
    finals = await _answer_all(client, jobs, request)
    keys = [key_of(a) for a in body.adapters]
    out_rows = []
    for n, (index, reference, _, rejected) in enumerate(items):
        outputs = {}
        for k, key in enumerate(keys):
            ev = finals[n * len(keys) + k]
            outputs[key] = {
                "text": ev.text.strip(),  # as the trainer's eval decodes it
                "finish_reason": ev.finish_reason,
                "tokens": (ev.usage or {}).get("completion_tokens", 0),
            }
        row = {"index": index, "reference": reference, "outputs": outputs}
        if rejected is not None:  # a preference row: the reference is its chosen answer
            row["rejected"] = rejected
        out_rows.append(row)
    references = [ref for _, ref, _, _ in items]
    metrics = {
        key: generation_metrics(
            [row["outputs"][key]["text"] for row in out_rows],
            references,
            [row["outputs"][key]["finish_reason"] == "eos" for row in out_rows],
            [row["outputs"][key]["tokens"] for row in out_rows],
        )
        for key in keys
    }
    return {"adapters": body.adapters, "max_new_tokens": max_new, "metrics": metrics, "rows": out_rows}
