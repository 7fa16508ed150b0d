"""OpenAI's fine-tuning API as views of the native training jobs: /v1/fine_tuning/jobs[/{id}[/cancel|
/pause|/resume|/events|/checkpoints]].

A fine-tuning job IS a native job (``service.jobs.actions.submit_job``, the queue of ``POST /train``): its id
is the job id, it shows in ``GET /train``, the runner trains it like any other. What the OpenAI request
asked for (model, files, hyperparameters, suffix, seed) is kept in the job's folder
(``fine_tuning.json``), which is also what makes a job a fine-tuning job: jobs made by ``POST /train``
are not listed here. Events and checkpoints are read from the trainer's progress lines.

Files are datasets (``service.routes.files``); the training file becomes the job's ``dataset`` and the
validation file its ``validation_dataset``. ``fine_tuned_model`` is the adapter's name, served by
``/v1/chat/completions`` as soon as the job has ``succeeded`` (the runner publishes before it says so).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from loracore import artifact
from loracore.artifact import valid_name
from loracore.atomic import write_atomic
from service.errors import ApiError
from service.jobs.actions import TrainRequest, cancel, pause, resume, submit_job
from service.jobs.checkpoints import servable_checkpoints
from service.jobs.datasets import file_not_found
from service.jobs.files import DATASET_ID, JOB_ID, JobPaths, job_paths, read_progress
from service.jobs.model import Job, JobError, StoreConflict
from service.jobs.sql import JobStore, process_store
from service.served_model import ServedModel, base_names
from service.settings import Settings

ORGANIZATION = "loraserve"
AUTO = "auto"
MAX_METADATA_PAIRS = 16

# --- the request -----------------------------------------------------------------------------------


class Hyperparameters(BaseModel):
    """OpenAI's hyperparameters; "auto" (or absent) is the trainer's default. See HYPERPARAMETERS."""

    model_config = ConfigDict(extra="forbid")

    # Checked by hand rather than as ``Literal["auto"] | int``: a union's errors would name its members
    # (``hyperparameters.n_epochs.int``) where the client wants the field.
    n_epochs: Any = AUTO
    batch_size: Any = AUTO
    learning_rate_multiplier: Any = AUTO

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _count(cls, value: Any) -> Any:
        if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f'must be "auto" or an integer of at least 1 (got {value!r})')

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, value: Any) -> Any:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1000
        if value == AUTO or ok:
            return value
        raise ValueError(f'must be "auto" or a number in (0, 1000] (got {value!r})')


class DpoHyperparameters(Hyperparameters):
    """DPO's hyperparameters: the supervised ones and ``beta`` (trainer ``dpo_beta``; "auto": 0.1)."""

    beta: Any = AUTO

    @field_validator("beta")
    @classmethod
    def _beta(cls, value: Any) -> Any:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 2
        if value == AUTO or ok:
            return value
        raise ValueError(f'must be "auto" or a number in (0, 2] (got {value!r})')


class _Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class _Dpo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"]
    supervised: _Supervised | None = None
    dpo: _Dpo | None = None


class FineTuningJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        """OpenAI's limits: at most 16 pairs, keys up to 64 characters, values up to 512."""
        if value is None:
            return value
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs (got {len(value)})")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError(f"key {key[:70]!r}: keys take up to 64 characters, values up to 512")
        return value


# OpenAI hyperparameter -> trainer key (trainer.config.TrainingSettings). The learning rate is the
# multiplier times the trainer's default learning_rate.
HYPERPARAMETERS = {
    "n_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "learning_rate_multiplier": "learning_rate",
}


def trainer_config(
    hp: Hyperparameters, seed: int, has_validation: bool, num_rows: int | None = None
) -> tuple[dict, dict]:
    """(the partial trainer config for ``POST /train``, the hyperparameters as resolved for the job).

    With ``num_rows`` a checkpoint is saved at the end of every epoch, as OpenAI does (each is servable
    while kept: ``service.jobs.checkpoints``)."""
    from trainer.config import TrainingSettings

    defaults = TrainingSettings()
    training: dict[str, Any] = {"seed": seed}
    resolved: dict[str, Any] = {}
    if isinstance(hp, DpoHyperparameters):
        training["method"] = "dpo"
        resolved["beta"] = training["dpo_beta"] = defaults.dpo_beta if hp.beta == AUTO else float(hp.beta)
    auto = auto_hyperparameters(num_rows)
    for name, key in HYPERPARAMETERS.items():
        value = getattr(hp, name)
        if name == "learning_rate_multiplier":
            mult = auto[name] if value == AUTO else float(value)
            training[key] = mult * defaults.learning_rate
            resolved[name] = mult
        else:
            resolved[name] = auto[name] if value == AUTO else value
            training[key] = resolved[name]
    if not has_validation:  # as OpenAI: without a validation file every row trains, nothing is held out
        training["eval_fraction"] = 0.0
    if num_rows:  # every row trains (validation rows come from their own file): an epoch is this many steps
        training["save_steps"] = math.ceil(num_rows / training["per_device_train_batch_size"])
    return {"training": training}, resolved


# OpenAI's published rule for n_epochs "auto" (the chat fine-tuning data preparation cookbook): 3 epochs,
# raised so that at least 100 examples are trained on and lowered so that at most 25,000 are, within 1-25.
TARGET_EPOCHS, MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES, MAX_AUTO_EPOCHS = 3, 100, 25_000, 25
MAX_AUTO_BATCH = 8  # the trainer's per-device default: what one device's LoRA step is sized for


def auto_hyperparameters(num_rows: int | None) -> dict[str, Any]:
    """What "auto" resolves to for a training file of ``num_rows`` rows (None: unknown, the trainer's
    defaults): ``n_epochs`` by OpenAI's rule above; ``batch_size`` about 0.2 % of the rows (OpenAI's
    proportion), 1 to 8; ``learning_rate_multiplier`` 1 (the trainer's LoRA rate, 2e-4)."""
    if not num_rows:
        return {"n_epochs": TARGET_EPOCHS, "batch_size": MAX_AUTO_BATCH, "learning_rate_multiplier": 1.0}
    epochs = TARGET_EPOCHS
    if num_rows * epochs < MIN_TARGET_EXAMPLES:
        epochs = min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / num_rows))
    elif num_rows * epochs > MAX_TARGET_EXAMPLES:
        epochs = max(1, MAX_TARGET_EXAMPLES // num_rows)
    batch = min(MAX_AUTO_BATCH, max(1, math.ceil(0.002 * num_rows)))
    return {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": 1.0}


def adapter_name(base_id: str, suffix: str | None) -> str:
    """``ft-<base>-<suffix>-<12 hex>``, sanitised to the adapter-name rule (loracore.artifact), cut to fit."""
    tail = uuid.uuid4().hex[:12]
    head = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(["ft", base_id, *([suffix] if suffix else [])]))
    head = re.sub(r"\.{2,}", ".", head)[: 64 - len(tail) - 1].rstrip("-.")
    name = f"{head}-{tail}"
    assert valid_name(name), name
    return name


# --- the views -------------------------------------------------------------------------------------


def _int(ts: float | None) -> int | None:
    return None if ts is None else int(ts)


def read_spec(paths: JobPaths) -> dict[str, Any] | None:
    try:
        return json.loads(paths.fine_tuning.read_text())
    except (OSError, ValueError):
        return None


def estimated_finish(job: Job) -> int | None:
    """Unix seconds a running job should end at: the trainer's ETA, from the moment it reported it.

    The trainer measures its rate over its own run (a resumed job's trainer starts a new one), so the
    time a job spent paused or queued never slows the rate down; serving yields (``progress.
    yielded_seconds``) do count, as they recur. Anchored at the report, not at the request, the
    estimate stays put between progress lines. A job that is not running (queued, paused, ended) has
    none: the clock of a paused job stops until it is resumed."""
    eta = job.progress.get("eta_seconds")
    if job.status != "running" or eta is None:
        return None
    return int(job.updated_at + float(eta))


def job_object(job: Job, spec: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's FineTuningJob for a native job. Native statuses are OpenAI's, less ``validating_files``
    (files are validated during the create request itself)."""
    hp = spec["hyperparameters"]
    kind = spec.get("method", "supervised")
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": int(job.created_at),
        "finished_at": _int(job.finished_at),
        "model": spec["model"],
        "fine_tuned_model": job.adapter if job.status == "succeeded" else None,
        "organization_id": ORGANIZATION,
        "result_files": [],
        "status": job.status,
        "training_file": spec["training_file"],
        "validation_file": spec.get("validation_file"),
        "hyperparameters": hp,
        "method": {"type": kind, kind: {"hyperparameters": hp}},
        "seed": spec["seed"],
        "user_provided_suffix": spec.get("suffix"),
        "metadata": spec.get("metadata"),
        "integrations": [],
        "trained_tokens": job.progress.get("trained_tokens"),
        "estimated_finish": estimated_finish(job),
        "error": (
            {"code": "training_failed", "message": job.error or "training failed", "param": None}
            if job.status == "failed"
            else None
        ),
    }


def _short(job: Job) -> str:
    return job.id.removeprefix("job-")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def job_events(job: Job, lines: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """OpenAI's events, oldest first: the creation, one per progress line, the job's end.

    An event's sequence number (in its id) is 0 for the creation, the byte offset where its progress
    line ends, and the file's size + 1 for the end: stable while the file grows, so ``after`` works.
    """

    def event(seq: int, at: float | None, message: str, level: str = "info", data: Any = None) -> dict:
        return {
            "id": f"ftevent-{_short(job)}-{seq}",
            "object": "fine_tuning.job.event",
            "created_at": int(at or job.created_at),
            "level": level,
            "message": message,
            "type": "metrics" if data is not None and "step" in data else "message",
            "data": data,
        }

    out = [event(0, job.created_at, f"Created fine-tuning job: {job.id}")]
    end = 0
    for end, ev in lines:
        kind, at = ev.get("event"), ev.get("time")
        step, total = ev.get("step"), ev.get("total_steps")
        if kind == "start":
            resumed = f", resumed at step {step}" if ev.get("resumed_from") else ""
            out.append(event(end, at, f"Fine-tuning job started: {total} steps{resumed}"))
        elif kind == "step":
            data = {
                "step": step,
                "total_steps": total,
                "train_loss": ev.get("loss"),
                "epoch": ev.get("epoch"),
            }
            out.append(
                event(end, at, f"Step {step}/{total}: training loss={_fmt(ev.get('loss'))}", data=data)
            )
        elif kind == "eval":
            data = {"step": step, "total_steps": total, "valid_loss": ev.get("eval_loss")}
            msg = f"Step {step}/{total}: validation loss={_fmt(ev.get('eval_loss'))}"
            out.append(event(end, at, msg, data=data))
        elif kind == "checkpoint":
            out.append(event(end, at, f"Checkpoint created at step {step}"))
        elif kind == "done":
            out.append(event(end, at, f"Training finished at step {step}"))
        elif kind == "error":
            out.append(event(end, at, str(ev.get("message") or "the trainer reported an error"), "error"))
    if job.finished:
        seq = end + 1
        if job.status == "succeeded":
            out.append(event(seq, job.finished_at, f"New fine-tuned model created: {job.adapter}"))
        elif job.status == "failed":
            out.append(event(seq, job.finished_at, f"The job failed: {job.error}", "error"))
        else:
            out.append(event(seq, job.finished_at, "The job was cancelled"))
    return out


def job_checkpoints(
    job: Job, lines: list[tuple[int, dict[str, Any]]], servable: dict[int, str]
) -> list[dict[str, Any]]:
    """One per checkpoint the job keeps servable (``servable``: step -> ``<adapter>@<version id>``,
    ``service.jobs.checkpoints``), plus the published adapter once the job succeeded; newest first. Each
    ``fine_tuned_model_checkpoint`` is a model for ``/v1/*`` and an adapter for ``/generate``."""
    found: dict[int, dict[str, Any]] = {}
    train_loss: dict[int, Any] = {}

    def add(step: int, at: float | None, loss: Any, valid: Any, model: str) -> None:
        metrics = {"step": float(step), "train_loss": loss, "valid_loss": valid}
        found[step] = {
            "id": f"ftckpt-{_short(job)}-{step}",
            "object": "fine_tuning.job.checkpoint",
            "created_at": int(at or job.created_at),
            "fine_tuned_model_checkpoint": model,
            "fine_tuning_job_id": job.id,
            "step_number": step,
            "metrics": {k: v for k, v in metrics.items() if v is not None},
        }

    done = None
    for _, ev in lines:
        step = int(ev.get("step") or 0)
        if ev.get("event") == "step":
            train_loss[step] = ev.get("loss")
        elif ev.get("event") == "checkpoint" and step in servable:
            loss = train_loss.get(step, ev.get("loss"))
            add(step, ev.get("time"), loss, ev.get("eval_loss"), servable[step])
        elif ev.get("event") == "done":
            done = ev
    if job.status == "succeeded" and done is not None:
        step, valid = int(done.get("step") or 0), done.get("eval_loss")
        if done.get("selected") == "best" and done.get("best_step") is not None:  # the best step's weights
            step, valid = int(done["best_step"]), done.get("best_eval_loss")
        add(step, job.finished_at, train_loss.get(step, done.get("loss")), valid, job.adapter)
    return [found[s] for s in sorted(found, reverse=True)]


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """A cursor page of newest-first ``items``: those after the one with id ``after``."""
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


# --- routes ----------------------------------------------------------------------------------------

_NATIVE_PARAMS = {
    "dataset": "training_file",
    "validation_dataset": "validation_file",
    "adapter": "suffix",
    "init_adapter": "model",
}


@dataclass(frozen=True)
class FineTuningContext:
    """What the handlers share, set on ``app.state.fine_tuning`` by ``register_fine_tuning_routes``."""

    settings: Settings
    base_id: str  # the served base's id: the model a job is trained on
    base_names: frozenset[str]  # every name ``model`` may give the base by

    def store(self) -> JobStore:
        return process_store(self.settings.jobs_db)


def _context(request: Request) -> FineTuningContext:
    return request.app.state.fine_tuning


def register_fine_tuning_routes(app: FastAPI, settings: Settings, auth: Callable, model: ServedModel) -> None:
    base_id, names = base_names(settings, model)
    app.state.fine_tuning = FineTuningContext(settings, base_id, names)
    deps = [Depends(auth)]
    tags = ["fine-tuning"]
    one = "/v1/fine_tuning/jobs/{fine_tuning_job_id}"
    app.add_api_route("/v1/fine_tuning/jobs", create_job, methods=["POST"], dependencies=deps, tags=tags)
    app.add_api_route("/v1/fine_tuning/jobs", list_jobs, methods=["GET"], dependencies=deps, tags=tags)
    app.add_api_route(one, retrieve_job, methods=["GET"], dependencies=deps, tags=tags)
    app.add_api_route(one + "/cancel", cancel_job, methods=["POST"], dependencies=deps, tags=tags)
    app.add_api_route(one + "/pause", pause_job, methods=["POST"], dependencies=deps, tags=tags)
    app.add_api_route(one + "/resume", resume_job, methods=["POST"], dependencies=deps, tags=tags)
    app.add_api_route(one + "/events", list_events, methods=["GET"], dependencies=deps, tags=tags)
    app.add_api_route(one + "/checkpoints", list_checkpoints, methods=["GET"], dependencies=deps, tags=tags)


def _load(ctx: FineTuningContext, job_id: str) -> tuple[Job, dict[str, Any]]:
    job = ctx.store().get(job_id) if JOB_ID.match(job_id) else None
    spec = read_spec(job_paths(ctx.settings, job.id)) if job is not None else None
    if job is None or spec is None:
        made_by_train = " (jobs made by POST /train are under GET /train)" if job is not None else ""
        raise ApiError(
            404, "job_not_found", f"no fine-tuning job '{job_id}'{made_by_train}", "fine_tuning_job_id"
        )
    return job, spec


def _check_model(ctx: FineTuningContext, name: str) -> str | None:
    """None for the served base; an adapter (``name`` or ``name@version``) is a warm start from it."""
    if name in ctx.base_names:
        return None
    if artifact.valid_ref(name) and artifact.resolve(ctx.settings.adapter_dir, name) is not None:
        return name
    raise ApiError(
        404,
        "model_not_found",
        f"the model {name!r} is neither the served base ({ctx.base_id!r}) nor an adapter",
        "model",
    )


def _check_file(ctx: FineTuningContext, file_id: str | None, param: str) -> None:
    if file_id is None:
        return
    if not (DATASET_ID.match(file_id) and ctx.store().get_dataset(file_id)):
        raise file_not_found(file_id, param)


def _create(ctx: FineTuningContext, body: FineTuningJobRequest) -> dict[str, Any]:
    init_adapter = _check_model(ctx, body.model)
    if body.integrations:
        raise ApiError(422, "invalid_request", "integrations are not supported", "integrations")
    hp: Hyperparameters | None = body.hyperparameters
    kind = body.method.type if body.method is not None else "supervised"
    inner = getattr(body.method, kind, None) if body.method is not None else None
    if kind == "dpo" and hp is not None:
        msg = "a dpo job takes its hyperparameters in method.dpo.hyperparameters"
        raise ApiError(422, "invalid_request", msg, "hyperparameters")
    if inner is not None and inner.hyperparameters is not None:
        if hp is not None:
            msg = "give hyperparameters once: top-level or in method.supervised, not both"
            raise ApiError(422, "invalid_request", msg, "hyperparameters")
        hp = inner.hyperparameters
    if kind == "dpo" and hp is None:
        hp = DpoHyperparameters()
    _check_file(ctx, body.training_file, "training_file")
    _check_file(ctx, body.validation_file, "validation_file")
    from trainer.config import TrainingSettings

    seed = TrainingSettings().seed if body.seed is None else body.seed
    dataset = ctx.store().get_dataset(body.training_file)
    config, resolved = trainer_config(
        hp or Hyperparameters(),
        seed,
        body.validation_file is not None,
        dataset.num_rows if dataset is not None else None,
    )
    spec = {
        "model": body.model,
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "hyperparameters": resolved,
        "method": kind,
        "suffix": body.suffix,
        "seed": seed,
        "metadata": body.metadata,
    }
    req = TrainRequest(
        adapter=adapter_name(ctx.base_id, body.suffix),
        dataset=body.training_file,
        validation_dataset=body.validation_file,
        config=config,
        init_adapter=init_adapter,
    )

    def write_spec(paths: JobPaths) -> None:
        write_atomic(paths.fine_tuning, json.dumps(spec, ensure_ascii=False))

    try:
        job, _ = submit_job(ctx.store(), ctx.settings, req, extra=write_spec)
    except StoreConflict:  # its param is the native request's too
        raise
    except JobError as exc:  # the native request's field names, in this API's terms
        if exc.param is not None:  # "dataset[3]" -> "training_file[3]"
            head, bracket, rest = exc.param.partition("[")
            exc.param = _NATIVE_PARAMS.get(head, head) + bracket + rest
        raise
    return job_object(job, spec)


async def create_job(body: FineTuningJobRequest, request: Request) -> dict[str, Any]:
    """A native training job on the served base, from uploaded files (see docs/openai.md)."""
    return await run_in_threadpool(_create, _context(request), body)


def _list_all(
    ctx: FineTuningContext, after: str | None, limit: int, metadata: dict[str, str]
) -> dict[str, Any]:
    out = []
    for job in ctx.store().list_jobs(None, 1_000_000):  # newest first
        spec = read_spec(job_paths(ctx.settings, job.id))
        if spec is None:
            continue
        tags = spec.get("metadata") or {}
        if all(tags.get(key) == value for key, value in metadata.items()):
            out.append(job_object(job, spec))
    return _page(out, after, limit)


async def list_jobs(
    request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=1000)
) -> dict[str, Any]:
    """``?metadata[key]=value`` (any number) keeps the jobs whose metadata has every such pair."""
    metadata = {
        k[len("metadata[") : -1]: v
        for k, v in request.query_params.multi_items()
        if k.startswith("metadata[") and k.endswith("]")
    }
    return await run_in_threadpool(_list_all, _context(request), after, limit, metadata)


async def retrieve_job(fine_tuning_job_id: str, request: Request) -> dict[str, Any]:
    return job_object(*await run_in_threadpool(_load, _context(request), fine_tuning_job_id))


def _act(ctx: FineTuningContext, job_id: str, action: Callable[[JobStore, Job], Job]) -> dict[str, Any]:
    job, spec = _load(ctx, job_id)
    return job_object(action(ctx.store(), job), spec)


async def cancel_job(fine_tuning_job_id: str, request: Request) -> dict[str, Any]:
    """Queued: cancelled now. Running: the trainer stops at its next step (status ``running`` until
    then, ``cancelled`` after)."""
    return await run_in_threadpool(_act, _context(request), fine_tuning_job_id, cancel)


async def pause_job(fine_tuning_job_id: str, request: Request) -> dict[str, Any]:
    """Queued: paused now. Running: the trainer writes a checkpoint at its next step and exits, freeing
    its slot (status ``running`` until then, ``paused`` after)."""
    return await run_in_threadpool(_act, _context(request), fine_tuning_job_id, pause)


async def resume_job(fine_tuning_job_id: str, request: Request) -> dict[str, Any]:
    """Paused: queued again; training resumes from the pause's checkpoint with the same loss curve."""
    return await run_in_threadpool(_act, _context(request), fine_tuning_job_id, resume)


def _lines_of(ctx: FineTuningContext, job: Job) -> list[tuple[int, dict[str, Any]]]:
    return read_progress(job_paths(ctx.settings, job.id).progress, 0)[0]


def _events(ctx: FineTuningContext, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
    job, _ = _load(ctx, job_id)
    return _page(job_events(job, _lines_of(ctx, job))[::-1], after, limit)


async def list_events(
    fine_tuning_job_id: str,
    request: Request,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=10000),
) -> dict[str, Any]:
    """Newest first; for a live stream of the same progress use GET /train/{id}/events (SSE)."""
    return await run_in_threadpool(_events, _context(request), fine_tuning_job_id, after, limit)


def _checkpoints(ctx: FineTuningContext, job_id: str, after: str | None, limit: int) -> dict[str, Any]:
    job, _ = _load(ctx, job_id)
    servable = servable_checkpoints(ctx.settings, job_paths(ctx.settings, job.id), job.adapter)
    return _page(job_checkpoints(job, _lines_of(ctx, job), servable), after, limit)


async def list_checkpoints(
    fine_tuning_job_id: str, request: Request, after: str | None = None, limit: int = Query(10, ge=1, le=1000)
) -> dict[str, Any]:
    return await run_in_threadpool(_checkpoints, _context(request), fine_tuning_job_id, after, limit)
