"""OpenAI's Files API for fine-tuning data: POST /v1/files, GET /v1/files, GET|DELETE /v1/files/{id},
GET /v1/files/{id}/content.

A file IS a dataset (``service.jobs.datasets``): validated row by row like ``POST /datasets``, stored the
same way, and its id is the dataset id (``ds-…``), usable as ``training_file`` / ``validation_file`` and
as ``dataset`` in ``POST /train`` alike. The upload's filename and purpose are kept beside the rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from service.errors import ApiError
from service.jobs.datasets import file_not_found, save_dataset
from service.jobs.files import DATASET_ID, dataset_meta_path, dataset_path
from service.jobs.model import Dataset
from service.jobs.sql import process_store
from service.settings import Settings
from service.uploads import read_upload_form

PURPOSE = "fine-tune"  # the one purpose served: training data


def file_json(settings: Settings, ds: Dataset) -> dict[str, Any]:
    """OpenAI's FileObject for a dataset (one not uploaded as a file is named ``<id>.jsonl``)."""
    try:
        meta = json.loads(dataset_meta_path(settings, ds.id).read_text())
    except (OSError, ValueError):
        meta = {}
    return {
        "id": ds.id,
        "object": "file",
        "bytes": ds.size_bytes,
        "created_at": int(ds.created_at),
        "filename": meta.get("filename") or f"{ds.id}.jsonl",
        "purpose": meta.get("purpose") or PURPOSE,
        "status": "processed",  # validated before the upload was answered
        "status_details": None,
        "expires_at": None,
    }


def _save_file(settings: Settings, raw: bytes, filename: str | None) -> Dataset:
    meta = {"filename": filename or "upload.jsonl", "purpose": PURPOSE}
    return save_dataset(process_store(settings.jobs_db), settings, raw, "file", meta)


def _delete_file(settings: Settings, file_id: str) -> bool:
    if not process_store(settings.jobs_db).delete_dataset(file_id):
        return False
    for path in (dataset_path(settings, file_id), dataset_meta_path(settings, file_id)):
        path.unlink(missing_ok=True)  # jobs hold their own links/copies of the rows
    return True


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": [PURPOSE]},
                    },
                    "required": ["file", "purpose"],
                }
            }
        },
    }
}


@dataclass(frozen=True)
class FilesContext:
    """What the handlers share, set on ``app.state.files`` by ``register_file_routes``."""

    settings: Settings


def _context(request: Request) -> FilesContext:
    return request.app.state.files


def register_file_routes(app: FastAPI, settings: Settings, auth: Callable) -> None:
    app.state.files = FilesContext(settings)
    deps = [Depends(auth)]
    tags = ["fine-tuning"]
    app.add_api_route(
        "/v1/files", create_file, methods=["POST"], dependencies=deps, tags=tags, openapi_extra=_UPLOAD_BODY
    )
    app.add_api_route("/v1/files", list_files, methods=["GET"], dependencies=deps, tags=tags)
    app.add_api_route("/v1/files/{file_id}", get_file, methods=["GET"], dependencies=deps, tags=tags)
    app.add_api_route(
        "/v1/files/{file_id}/content", file_content, methods=["GET"], dependencies=deps, tags=tags
    )
    app.add_api_route("/v1/files/{file_id}", delete_file, methods=["DELETE"], dependencies=deps, tags=tags)


async def _load(settings: Settings, file_id: str) -> Dataset:
    store = process_store(settings.jobs_db)
    ds = await run_in_threadpool(store.get_dataset, file_id) if DATASET_ID.match(file_id) else None
    if ds is None:
        raise file_not_found(file_id)
    return ds


async def create_file(request: Request) -> dict[str, Any]:
    """Upload JSONL training rows (chat ``{"messages": [...]}`` or prompt/completion rows)."""
    settings = _context(request).settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        msg = "upload the file as multipart/form-data (fields file and purpose)"
        raise ApiError(422, "invalid_request", msg, "file")
    upload = await read_upload_form(request, settings)
    purpose = upload.fields.get("purpose")
    if purpose != PURPOSE:
        got = "missing" if purpose is None else repr(purpose)
        raise ApiError(
            422,
            "invalid_purpose",
            f"purpose must be '{PURPOSE}' (got {got}): files are training data",
            "purpose",
        )
    ds = await run_in_threadpool(_save_file, settings, upload.data, upload.filename)
    return file_json(settings, ds)


async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = Query(10000, ge=1, le=10000),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> dict[str, Any]:
    settings = _context(request).settings
    datasets = await run_in_threadpool(process_store(settings.jobs_db).list_datasets)
    if order == "asc":
        datasets.reverse()
    files = [file_json(settings, ds) for ds in datasets]
    if purpose is not None:
        files = [f for f in files if f["purpose"] == purpose]
    if after is not None:
        ids = [f["id"] for f in files]
        files = files[ids.index(after) + 1 :] if after in ids else []
    return {"object": "list", "data": files[:limit], "has_more": len(files) > limit}


async def get_file(file_id: str, request: Request) -> dict[str, Any]:
    settings = _context(request).settings
    return file_json(settings, await _load(settings, file_id))


async def file_content(file_id: str, request: Request) -> FileResponse:
    """The stored rows as JSON lines (as validated: one compact JSON object a line)."""
    settings = _context(request).settings
    ds = await _load(settings, file_id)
    return FileResponse(dataset_path(settings, ds.id), media_type="application/jsonl")


async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
    settings = _context(request).settings
    await _load(settings, file_id)
    if not await run_in_threadpool(_delete_file, settings, file_id):
        raise file_not_found(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
