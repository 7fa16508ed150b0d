"""Request bodies read with a size cap: a JSON body, an adapter upload, a dataset (raw JSONL or a
multipart ``file``). HTTP glue for the routes; what the bytes must hold is checked by their owners."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.errors import ApiError
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
