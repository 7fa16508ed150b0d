"""What a client can do to jobs: submit one (checks, files, then the store row), cancel, pause, resume."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from loracore import artifact
from loracore.atomic import publish_dir, write_atomic
from service.jobs.datasets import link_dataset
from service.jobs.files import DATASET_ID, JobPaths, dataset_path, job_paths
from service.jobs.model import Job, JobError, cancellable, new_job_id, pausable, resumable
from service.jobs.sql import JobStore
from service.jobs.validate import check_adapter_name, check_config, check_rows, parse_jsonl, to_jsonl
from service.settings import Settings


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str
    data: list[Any] | None = None
    dataset: str | None = None
    validation_data: list[Any] | None = None  # evaluated on instead of a held-out fraction of the rows
    validation_dataset: str | None = None
    config: dict[str, Any] | None = None
    overwrite: bool = False
    # "sft": rows of prompts and answers; "dpo": preference rows (docs/training.md, "Preference tuning").
    # None: the config's training.method, else sft.
    method: Literal["sft", "dpo"] | None = None
    # a warm start: "name" or "name@version" of an adapter on the served base, of the same LoRA rank
    init_adapter: str | None = None


def submit_job(
    store: JobStore,
    settings: Settings,
    req: TrainRequest,
    key: str | None = None,
    digest: str | None = None,
    extra: Callable[[JobPaths], None] | None = None,
) -> tuple[Job, bool]:
    """Validate ``req`` (``JobError`` naming the problem), write the job's files, insert the queued row.

    Returns (job, created); with an ``Idempotency-Key`` seen before, the earlier job and False.
    ``StoreConflict`` propagates (adapter already in training, key reused with another body).
    ``extra`` writes more files into the job's folder before the row exists (the fine-tuning API's record).
    """
    check_adapter_name(req.adapter)
    if (req.data is None) == (req.dataset is None):
        msg = "give exactly one of 'data' (rows) or 'dataset' (an id)"
        raise JobError("invalid_request", msg, "data")
    init = _init_adapter(settings, req.init_adapter) if req.init_adapter is not None else None
    cfg = check_config(_with_method_and_init(req, init), settings)
    method = cfg.training.method
    num_rows = _check_source(settings, store, req.data, req.dataset, "data", "dataset", method)
    if req.validation_data is not None and req.validation_dataset is not None:
        msg = "give at most one of 'validation_data' (rows) or 'validation_dataset' (an id)"
        raise JobError("invalid_request", msg, "validation_data")
    has_val = req.validation_data is not None or req.validation_dataset is not None
    if has_val:
        _check_source(
            settings,
            store,
            req.validation_data,
            req.validation_dataset,
            "validation_data",
            "validation_dataset",
            method,
        )
    if init is not None:
        _check_init_shape(init, cfg, req.init_adapter)
    if not req.overwrite and (settings.adapter_dir / req.adapter).exists():
        raise JobError(
            "adapter_exists",
            f"adapter '{req.adapter}' already exists; pass 'overwrite': true to replace it",
            "adapter",
        )
    job = Job(
        id=new_job_id(),
        adapter=req.adapter,
        status="queued",
        overwrite=req.overwrite,
        base_model=settings.model,
        dataset=req.dataset,
        num_rows=num_rows,
    )
    paths = job_paths(settings, job.id)
    # Files first, row second: a runner never sees a job without its files.
    paths.root.mkdir(parents=True)
    try:
        write_atomic(paths.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _write_rows(settings, req.data, req.dataset, paths.data)
        if init is not None:  # pinned now: the name may get a newer version before the job runs
            _copy_adapter(init.folder, paths.init_adapter)
        if has_val:
            _write_rows(settings, req.validation_data, req.validation_dataset, paths.val)
        if extra is not None:
            extra(paths)
        created, is_new = store.create_job(job, key, digest)
    except BaseException:
        shutil.rmtree(paths.root, ignore_errors=True)
        raise
    if not is_new:  # an idempotent retry that raced the first request: keep the first job only
        shutil.rmtree(paths.root, ignore_errors=True)
    return created, is_new


def _check_source(
    settings: Settings,
    store: JobStore,
    rows: list[Any] | None,
    dataset: str | None,
    rows_param: str,
    dataset_param: str,
    method: str,
) -> int:
    """How many rows: inline ``rows`` validated for ``method`` (422 naming ``rows_param[i]``), or a stored
    dataset's (404 naming ``dataset_param`` when there is none). A dataset was checked row by row when it
    was uploaded, for either method; a DPO job's is read again, since it must hold preference rows
    only (and an SFT job's must hold none)."""
    if dataset is not None:
        ds = store.get_dataset(dataset) if DATASET_ID.match(dataset) else None
        if ds is None:
            raise JobError("dataset_not_found", f"dataset '{dataset}' does not exist", dataset_param)
        stored, lines = parse_jsonl(dataset_path(settings, dataset).read_bytes(), dataset_param)
        check_rows(stored, dataset_param, line_numbers=lines or None, method=method)
        return ds.num_rows
    return check_rows(rows, rows_param, method=method)


def _with_method_and_init(req: TrainRequest, init: artifact.Version | None) -> Any:
    """The request's config with ``method`` as ``training.method``, and a warm start's LoRA settings
    (rank, alpha, targets, dropout) where the request gives none: the adapter's shape is fixed."""
    raw = {} if req.config is None else req.config
    if not isinstance(raw, dict):
        return raw  # check_config names the problem
    raw = json.loads(json.dumps(raw))
    training = raw.get("training")
    if req.method is not None and isinstance(training, dict):
        asked = training.get("method", req.method)
        if asked != req.method:
            msg = f"method is {req.method!r} but config.training.method is {asked!r}; give one"
            raise JobError("invalid_request", msg, "method")
    if req.method is not None:
        raw.setdefault("training", {})
        if isinstance(raw["training"], dict):
            raw["training"]["method"] = req.method
    if init is not None and "lora" not in raw:
        theirs = json.loads((init.folder / artifact.CONFIG_FILE).read_text())
        raw["lora"] = {
            "r": theirs.get("r"),
            "lora_alpha": theirs.get("lora_alpha"),
            "lora_dropout": theirs.get("lora_dropout", 0.0),
            "target_modules": sorted(theirs.get("target_modules") or []),
            "use_rslora": bool(theirs.get("use_rslora", False)),
            "use_dora": bool(theirs.get("use_dora", False)),
        }
    return raw


def _init_adapter(settings: Settings, ref: str) -> artifact.Version:
    """A warm start's adapter version (404 naming ``init_adapter`` when absent), on the served base."""
    problem = artifact.ref_problem(ref)
    if problem:
        code = (
            "invalid_adapter_version"
            if artifact.valid_name(artifact.split_ref(ref)[0])
            else "invalid_adapter_name"
        )
        raise JobError(code, problem, "init_adapter")
    version = artifact.resolve(settings.adapter_dir, ref)
    if version is None:
        raise JobError(
            "adapter_not_found", artifact.missing_message(settings.adapter_dir, ref), "init_adapter"
        )
    record = artifact.read_record(version.folder)
    base = record.base_model if record is not None else None
    if base is not None and base != settings.model:
        raise JobError(
            "init_adapter_mismatch",
            f"init_adapter {ref!r} was trained on base {base!r}; this server trains on {settings.model!r}",
            "init_adapter",
        )
    return version


def _check_init_shape(init: artifact.Version, cfg: Any, ref: str | None) -> None:
    """The job's LoRA must have the warm start's shape (rank, alpha, targets): 422 naming the mismatch."""
    theirs = json.loads((init.folder / artifact.CONFIG_FILE).read_text())
    lora = cfg.lora
    mine = {
        "r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "use_rslora": lora.use_rslora,
        "use_dora": lora.use_dora,
    }
    for key, value in mine.items():
        got = theirs.get(key, False if key.startswith("use_") else None)
        if got != value:
            raise JobError(
                "init_adapter_mismatch",
                f"init_adapter {ref!r} has lora {key} {got!r}, but config.lora.{key} is {value!r}",
                f"config.lora.{key}",
            )
    targets = sorted(theirs.get("target_modules") or [])
    if lora.target_modules == "all-linear" or sorted(lora.target_modules) != targets:
        raise JobError(
            "init_adapter_mismatch",
            f"init_adapter {ref!r} targets {targets!r}, but config.lora.target_modules is "
            f"{lora.target_modules!r}",
            "config.lora.target_modules",
        )


def _copy_adapter(source: Path, dest: Path) -> None:
    """The adapter's config and weights (and record), copied into a temporary folder and renamed in."""
    tmp = dest.with_name(f".tmp-{dest.name}")
    tmp.mkdir()
    for name in (artifact.CONFIG_FILE, artifact.WEIGHTS_FILE, artifact.RECORD_FILE):
        if (source / name).is_file():
            shutil.copyfile(source / name, tmp / name)
    publish_dir(tmp, dest)


def _write_rows(settings: Settings, rows: list[Any] | None, dataset: str | None, dest: Path) -> None:
    if dataset is not None:
        link_dataset(settings, dataset, dest)
    else:
        write_atomic(dest, to_jsonl(rows or []))


def cancel(store: JobStore, job: Job) -> Job:
    """Cancel a queued job now, or ask the runner to stop a running one; ``job_finished`` once it
    succeeded or failed."""
    if not cancellable(job.status):
        raise JobError("job_finished", f"training job '{job.id}' already {job.status}", "job_id")
    was = job.status
    current = store.request_cancel(job.id)
    assert current is not None
    if was == "queued" and current.status == "cancelled":  # the runner never saw it: count it here
        from service import metrics

        metrics.TRAIN_JOBS_FINISHED.labels(status="cancelled").inc()
    if not cancellable(current.status):  # it ended while we asked
        raise JobError("job_finished", f"training job '{job.id}' already {current.status}", "job_id")
    return current


def pause(store: JobStore, job: Job) -> Job:
    """Pause a queued job now, or ask the runner to stop a running one at its next step (it writes a
    checkpoint and gives back its slot; the job shows ``paused`` then). ``job_finished`` once it ended,
    ``job_cancelling`` while a cancel is under way."""
    if not pausable(job.status):
        raise JobError("job_finished", f"training job '{job.id}' already {job.status}", "job_id")
    current = store.request_pause(job.id)
    assert current is not None
    if not pausable(current.status):  # it ended while we asked
        raise JobError("job_finished", f"training job '{job.id}' already {current.status}", "job_id")
    if current.status == "running" and current.cancel_requested:
        raise JobError("job_cancelling", f"training job '{job.id}' is being cancelled", "job_id")
    return current


def resume(store: JobStore, job: Job) -> Job:
    """Put a paused job back in the queue: the next runner slot resumes it from its checkpoint (same seed,
    same data order). A queued or running job answers as it is (a pause not yet carried out is
    withdrawn); ``job_finished`` once it ended."""
    if not resumable(job.status):
        raise JobError("job_finished", f"training job '{job.id}' already {job.status}", "job_id")
    current = store.resume(job.id)
    assert current is not None
    if not resumable(current.status):
        raise JobError("job_finished", f"training job '{job.id}' already {current.status}", "job_id")
    return current
