"""What a client can do to jobs: submit one (checks, files, then the store row) and cancel one."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from loracore.atomic import write_atomic
from service.jobs.datasets import link_dataset
from service.jobs.files import DATASET_ID, JobPaths, job_paths
from service.jobs.model import Job, JobError, cancellable, new_job_id
from service.jobs.sql import JobStore
from service.jobs.validate import check_adapter_name, check_config, check_rows, to_jsonl
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
    num_rows = _check_source(store, req.data, req.dataset, "data", "dataset")
    if req.validation_data is not None and req.validation_dataset is not None:
        msg = "give at most one of 'validation_data' (rows) or 'validation_dataset' (an id)"
        raise JobError("invalid_request", msg, "validation_data")
    has_val = req.validation_data is not None or req.validation_dataset is not None
    if has_val:
        _check_source(
            store, req.validation_data, req.validation_dataset, "validation_data", "validation_dataset"
        )
    cfg = check_config(req.config, settings)
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
    store: JobStore, rows: list[Any] | None, dataset: str | None, rows_param: str, dataset_param: str
) -> int:
    """How many rows: inline ``rows`` validated (422 naming ``rows_param[i]``), or a stored dataset's
    (404 naming ``dataset_param`` when there is none)."""
    if dataset is not None:
        ds = store.get_dataset(dataset) if DATASET_ID.match(dataset) else None
        if ds is None:
            raise JobError("dataset_not_found", f"dataset '{dataset}' does not exist", dataset_param)
        return ds.num_rows
    return check_rows(rows, rows_param)


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
