"""Datasets: every row validated, stored atomically as ``<data-dir>/datasets/<id>.jsonl``, linked into the
jobs that use them. (Reading an upload's bytes off a request is ``service.uploads``.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from loracore.atomic import write_atomic
from service.jobs.files import DATASET_ID, dataset_meta_path, dataset_path
from service.jobs.model import Dataset, JobError, new_dataset_id
from service.jobs.sql import JobStore
from service.jobs.validate import check_rows, parse_jsonl, to_jsonl
from service.settings import Settings


def save_dataset(
    store: JobStore,
    settings: Settings,
    raw: bytes,
    param: str = "data",
    meta: dict[str, Any] | None = None,
) -> Dataset:
    """Validate every row of an upload and store it; 422 names the first bad row as ``param[i]``.

    ``meta`` (a file upload's filename and purpose) is stored beside the rows.
    """
    rows, lines = parse_jsonl(raw, param)
    n = check_rows(rows, param, line_numbers=lines or None)
    data = to_jsonl(rows)
    ds = Dataset(
        id=new_dataset_id(),
        num_rows=n,
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        created_at=time.time(),
    )
    path = dataset_path(settings, ds.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    if meta is not None:
        write_atomic(dataset_meta_path(settings, ds.id), json.dumps(meta, ensure_ascii=False).encode())
    store.add_dataset(ds)
    return ds


def file_not_found(file_id: str, param: str = "file_id") -> JobError:
    """A file of OpenAI's files API (a dataset by another name) that does not exist."""
    return JobError("file_not_found", f"no file with id '{file_id}' (GET /v1/files lists them)", param)


def link_dataset(settings: Settings, dataset_id: str, dest: Path) -> None:
    """Give a job its own copy of a dataset (a hard link where possible: no bytes copied)."""
    src = dataset_path(settings, dataset_id)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def read_dataset_rows(settings: Settings, dataset_id: str | None, param: str = "dataset") -> list:
    """The rows of an uploaded dataset (checked when it was uploaded); 404 naming it if there is none."""
    path = dataset_path(settings, dataset_id) if dataset_id and DATASET_ID.match(dataset_id) else None
    if path is None or not path.is_file():
        raise JobError("dataset_not_found", f"dataset '{dataset_id}' does not exist", param)
    rows, _ = parse_jsonl(path.read_bytes(), param)
    return rows
