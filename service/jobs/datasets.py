"""Dataset uploads (``POST /datasets``) and the request bodies of ``POST /train``: read with a size cap,
validate every row, store atomically as ``<data-dir>/datasets/<id>.jsonl``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from loracore.atomic import write_atomic
from service.errors import ApiError
from service.jobs.files import DATASET_ID, dataset_meta_path, dataset_path
from service.jobs.store import Dataset, JobStore, new_dataset_id
from service.jobs.validate import check_rows, parse_jsonl, to_jsonl
from service.settings import Settings

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around an uploaded file


async def read_capped(request: Request, limit: int, what: str, hint: str = "") -> bytes:
    """The request body, refusing (413) as soon as it passes ``limit`` bytes."""

    def too_large(size: str) -> ApiError:
        return ApiError(
            413, "payload_too_large", f"{what} is {size} bytes; the limit is {limit} bytes{hint}", None
        )

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise too_large(f"more than {limit}")
    return bytes(buf)


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None = None  # the multipart file's name
    fields: dict[str, str] = field(default_factory=dict)  # the multipart form's other (text) fields


async def read_upload(request: Request, settings: Settings) -> bytes:
    """The JSONL bytes of an upload: the raw body, or the multipart file field ``file``."""
    return (await read_upload_form(request, settings)).data


async def read_upload_form(request: Request, settings: Settings) -> Upload:
    """An upload: the raw body, or the multipart file field ``file`` with the form's text fields."""
    limit = settings.max_dataset_bytes
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        return Upload(await read_capped(request, limit, "the dataset"))
    body = await read_capped(request, limit + MULTIPART_OVERHEAD, "the upload")
    try:
        form = await MultiPartParser(request.headers, _one_chunk(body), max_files=1, max_fields=10).parse()
    except MultiPartException as exc:
        raise ApiError(
            400, "invalid_multipart", f"could not read the multipart upload: {exc.message}"
        ) from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "missing_file", "the multipart upload needs a file field named 'file'", "file")
    data = await upload.read()
    await upload.close()
    if len(data) > limit:
        raise ApiError(
            413, "payload_too_large", f"the dataset is {len(data)} bytes; the limit is {limit} bytes"
        )
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    return Upload(data, upload.filename, fields)


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
        raise ApiError(404, "dataset_not_found", f"dataset '{dataset_id}' does not exist", param)
    rows, _ = parse_jsonl(path.read_bytes(), param)
    return rows


async def upload_dataset(request: Request, store: JobStore, settings: Settings) -> Dataset:
    raw = await read_upload(request, settings)
    return await run_in_threadpool(save_dataset, store, settings, raw)
