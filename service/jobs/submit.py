"""Turning a validated ``POST /train`` request into a queued job: checks, files, then the store row."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from service.errors import ApiError
from service.jobs.datasets import link_dataset
from service.jobs.files import DATASET_ID, JobPaths, job_paths
from service.jobs.store import Job, JobStore, new_job_id
from service.jobs.validate import check_adapter_name, check_config, check_rows, to_jsonl
from service.settings import Settings
from trainer.publish import write_atomic


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str
    data: list[Any] | None = None
    dataset: str | None = None
    # Validation rows (inline or a dataset id): written to the job's val.jsonl, the trainer's --val.
    validation_data: list[Any] | None = None
    validation_dataset: str | None = None
    config: dict[str, Any] | None = None
    overwrite: bool = False


def _check_dataset(store: JobStore, dataset_id: str, param: str) -> int:
    ds = store.get_dataset(dataset_id) if DATASET_ID.match(dataset_id) else None
    if ds is None:
        raise ApiError(404, "dataset_not_found", f"dataset '{dataset_id}' does not exist", param)
    return ds.num_rows


def submit_job(
    store: JobStore,
    settings: Settings,
    req: TrainRequest,
    key: str | None = None,
    digest: str | None = None,
    extra: Callable[[JobPaths], None] | None = None,
) -> tuple[Job, bool]:
    """Validate ``req`` (422/404/409 as ``ApiError``), write the job's files, insert the queued row.

    Returns (job, created); with an ``Idempotency-Key`` seen before, the earlier job and False.
    ``StoreConflict`` propagates (adapter already in training, key reused with another body).
    ``extra`` writes more files into the job's folder before the row exists (the fine-tuning API's record).
    """
    check_adapter_name(req.adapter)
    if (req.data is None) == (req.dataset is None):
        msg = "give exactly one of 'data' (rows) or 'dataset' (an id)"
        raise ApiError(422, "invalid_request", msg, "data")
    if req.dataset is not None:
        num_rows = _check_dataset(store, req.dataset, "dataset")
    else:
        num_rows = check_rows(req.data, "data")
    if req.validation_data is not None and req.validation_dataset is not None:
        msg = "give at most one of 'validation_data' (rows) or 'validation_dataset' (an id)"
        raise ApiError(422, "invalid_request", msg, "validation_data")
    if req.validation_dataset is not None:
        _check_dataset(store, req.validation_dataset, "validation_dataset")
    elif req.validation_data is not None:
        check_rows(req.validation_data, "validation_data")
    cfg = check_config(req.config, settings)
    if not req.overwrite and (settings.adapter_dir / req.adapter).exists():
        raise ApiError(
            409,
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
        if req.dataset is not None:
            link_dataset(settings, req.dataset, paths.data)
        else:
            write_atomic(paths.data, to_jsonl(req.data or []))
        if req.validation_dataset is not None:
            link_dataset(settings, req.validation_dataset, paths.val)
        elif req.validation_data is not None:
            write_atomic(paths.val, to_jsonl(req.validation_data))
        if extra is not None:
            extra(paths)
        created, is_new = store.create_job(job, key, digest)
    except BaseException:
        shutil.rmtree(paths.root, ignore_errors=True)
        raise
    if not is_new:  # an idempotent retry that raced the first request: keep the first job only
        shutil.rmtree(paths.root, ignore_errors=True)
    return created, is_new
