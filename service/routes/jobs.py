"""HTTP routes for training jobs and dataset uploads (/train, /datasets).

These run in the server's API processes (LitServe forks several): nothing is kept in memory, every
request reads and writes the SQLite store and the job's files. Blocking work (SQLite, validation,
file writes) runs in the thread pool so the event loop keeps serving /generate.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service.errors import ApiError, not_utf8_message
from service.jobs.actions import TrainRequest, cancel, pause, resume, submit_job
from service.jobs.datasets import save_dataset
from service.jobs.files import JOB_ID, job_paths, read_progress, tail_text
from service.jobs.model import PROGRESS_KEYS, STATUSES, Job
from service.jobs.sql import JobStore, process_store
from service.routes import SSE_PING, sse, sse_response
from service.settings import Settings
from service.text_input import check_text
from service.uploads import read_capped, read_upload

SSE_POLL_SECONDS = 0.5
SSE_PING_SECONDS = 15.0
MAX_LOG_BYTES = 16 * 1024 * 1024


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_json(job: Job, progress: dict[str, Any] | None = None) -> dict[str, Any]:
    """The public ``Job`` object (docs/api.md)."""
    src = job.progress if progress is None else progress
    prog = {key: src.get(key) for key in PROGRESS_KEYS}
    prog["step"] = prog["step"] or 0
    return {
        "job_id": job.id,
        "adapter": job.adapter,
        "status": job.status,
        "error": job.error,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "progress": prog,
        "cancel_requested": job.cancel_requested and not job.finished,
        "pause_requested": job.pause_requested and job.status == "running",
        "attempts": job.attempts,
        "dataset": job.dataset,
        "rows": job.num_rows,
        "overwrite": job.overwrite,
        "eval": job.eval,
        "warnings": job.warnings,
    }


def _request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _parse_train_request(raw: bytes) -> tuple[TrainRequest, dict[str, Any]]:
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ApiError(422, "invalid_json", not_utf8_message(exc)) from None
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_json", f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "the request body must be a JSON object")
    check_text(body)
    try:
        req = TrainRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        msg = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise ApiError(422, "invalid_request", msg, param) from None
    return req, body


_TRAIN_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": TrainRequest.model_json_schema()}},
    }
}
_DATASET_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-ndjson": {"schema": {"type": "string"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}


@dataclass(frozen=True)
class JobsContext:
    """What the handlers share, set on ``app.state.jobs`` by ``register_job_routes``."""

    settings: Settings

    def store(self) -> JobStore:
        return process_store(self.settings.jobs_db)


def _context(request: Request) -> JobsContext:
    return request.app.state.jobs


def register_job_routes(app: FastAPI, settings: Settings, auth: Callable) -> None:
    """Add /train and /datasets to ``app``; every route depends on ``auth``."""
    app.state.jobs = JobsContext(settings)
    deps = [Depends(auth)]
    tags = ["training"]
    app.add_api_route(
        "/train",
        create_job,
        methods=["POST"],
        status_code=202,
        dependencies=deps,
        tags=tags,
        openapi_extra=_TRAIN_BODY,
    )
    app.add_api_route("/train", list_jobs, methods=["GET"], dependencies=deps, tags=tags)
    app.add_api_route("/train/{job_id}", get_job, methods=["GET"], dependencies=deps, tags=tags)
    app.add_api_route("/train/{job_id}", cancel_job, methods=["DELETE"], dependencies=deps, tags=tags)
    app.add_api_route("/train/{job_id}/pause", pause_job, methods=["POST"], dependencies=deps, tags=tags)
    app.add_api_route("/train/{job_id}/resume", resume_job, methods=["POST"], dependencies=deps, tags=tags)
    app.add_api_route("/train/{job_id}/logs", job_logs, methods=["GET"], dependencies=deps, tags=tags)
    app.add_api_route("/train/{job_id}/events", job_events, methods=["GET"], dependencies=deps, tags=tags)
    app.add_api_route(
        "/datasets",
        create_dataset,
        methods=["POST"],
        status_code=201,
        dependencies=deps,
        tags=tags,
        openapi_extra=_DATASET_BODY,
    )


async def _call(fn, *args, **kwargs):
    return await run_in_threadpool(fn, *args, **kwargs)


async def _load_job(ctx: JobsContext, job_id: str) -> Job:
    job = await _call(ctx.store().get, job_id) if JOB_ID.match(job_id) else None
    if job is None:
        raise ApiError(404, "job_not_found", f"training job '{job_id}' does not exist", "job_id")
    return job


async def create_job(request: Request) -> JSONResponse:
    ctx = _context(request)
    raw = await read_capped(
        request,
        ctx.settings.max_dataset_bytes,
        "the request body",
        "; upload large datasets with POST /datasets and pass their id as 'dataset'",
    )
    req, body = await _call(_parse_train_request, raw)  # large bodies: keep the event loop free
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= 255):
        raise ApiError(
            422, "invalid_idempotency_key", "Idempotency-Key must be 1-255 characters", "Idempotency-Key"
        )
    digest = await _call(_request_hash, body)
    if key is not None:
        existing = await _call(ctx.store().find_idempotent, key, digest)
        if existing is not None:
            return _accepted(existing)
    created, _ = await _call(submit_job, ctx.store(), ctx.settings, req, key, digest)
    return _accepted(created)


async def list_jobs(
    request: Request,
    status: str | None = Query(None, description="queued|running|paused|succeeded|failed|cancelled"),
    limit: int = Query(100, ge=1, le=1000),
) -> dict[str, Any]:
    if status is not None and status not in STATUSES:
        raise ApiError(422, "invalid_status", f"status must be one of {', '.join(STATUSES)}", "status")
    jobs = await _call(_context(request).store().list_jobs, status, limit)
    return {"jobs": [job_json(j) for j in jobs]}


async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    return job_json(await _load_job(_context(request), job_id))


async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    ctx = _context(request)
    return job_json(await _call(cancel, ctx.store(), await _load_job(ctx, job_id)))


async def pause_job(job_id: str, request: Request) -> dict[str, Any]:
    """Queued: paused now. Running: checkpoint at the next step, trainer exits, then ``paused``."""
    ctx = _context(request)
    return job_json(await _call(pause, ctx.store(), await _load_job(ctx, job_id)))


async def resume_job(job_id: str, request: Request) -> dict[str, Any]:
    """Paused: back in the queue, resumed from the pause's checkpoint."""
    ctx = _context(request)
    return job_json(await _call(resume, ctx.store(), await _load_job(ctx, job_id)))


async def job_logs(
    job_id: str, request: Request, tail: int = Query(1024 * 1024, ge=1, le=MAX_LOG_BYTES)
) -> PlainTextResponse:
    ctx = _context(request)
    job = await _load_job(ctx, job_id)
    text = await _call(tail_text, job_paths(ctx.settings, job.id).log, tail)
    return PlainTextResponse(text)


async def job_events(job_id: str, request: Request) -> StreamingResponse:
    ctx = _context(request)
    job = await _load_job(ctx, job_id)
    last = request.headers.get("last-event-id", "")
    offset = int(last) if last.isdigit() else 0
    return sse_response(_event_stream(request, ctx.store(), ctx.settings, job, offset))


async def create_dataset(request: Request) -> dict[str, Any]:
    ctx = _context(request)
    raw = await read_upload(request, ctx.settings)
    ds = await _call(save_dataset, ctx.store(), ctx.settings, raw)
    return {"dataset": ds.id, "rows": ds.num_rows, "size_bytes": ds.size_bytes, "sha256": ds.sha256}


def _accepted(job: Job) -> JSONResponse:
    return JSONResponse(job_json(job), status_code=202, headers={"Location": f"/train/{job.id}"})


async def _event_stream(
    request: Request, store: JobStore, settings: Settings, job: Job, offset: int
) -> AsyncIterator[str]:
    """One event per progress line (id = byte offset, for Last-Event-ID), plus status changes; ends
    after the event that carries a finished status."""
    path = job_paths(settings, job.id).progress
    if not job.finished:  # a finished job replays its lines first, then its final status
        yield sse({**job_json(job), "event": "status"}, offset)
    status, last_sent = job.status, time.monotonic()
    while True:
        current = await run_in_threadpool(store.get, job.id)
        if current is None:  # deleted underneath us; nothing more will come
            return
        # The file is read after the status: lines written before the job ended are all sent first.
        events, offset = await run_in_threadpool(read_progress, path, offset)
        for end, ev in events:
            progress = {key: ev.get(key) for key in PROGRESS_KEYS}
            data = {**job_json(current, progress), "status": "running", "event": ev.get("event")}
            if ev.get("message"):
                data["message"] = ev["message"]
            yield sse(data, end)
            last_sent = time.monotonic()
        if current.status != status or current.finished:
            status = current.status
            yield sse({**job_json(current), "event": "status"}, offset)
            last_sent = time.monotonic()
            if current.finished:
                return
        if await request.is_disconnected():
            return
        if time.monotonic() - last_sent > SSE_PING_SECONDS:
            yield SSE_PING
            last_sent = time.monotonic()
        await asyncio.sleep(SSE_POLL_SECONDS)
