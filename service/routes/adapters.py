"""GET /adapters, GET|PUT|DELETE /adapters/{name}; PUT takes the multipart upload of a PEFT adapter;
PUT|DELETE /adapters/{name}/pin keep an adapter loaded (``service.adapters.pins``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from loracore.lora_format import BaseLayout
from loracore.template import ChatTemplate, base_chat_template
from service.adapters import pins, store
from service.errors import ApiError
from service.schemas import AdapterInfo, AdapterList, Deleted
from service.served_model import ServedModel
from service.settings import Settings
from service.uploads import MULTIPART_OVERHEAD, read_capped
from service.worker_status import read_status


def _loaded_adapters(settings: Settings) -> frozenset[str]:
    status = read_status(settings.worker_status_path) or {}
    return frozenset(status.get("loaded_adapters") or [])


@dataclass(frozen=True)
class AdaptersContext:
    """What the handlers share, set on ``app.state.adapters`` by ``register_adapter_routes``."""

    settings: Settings
    layout: BaseLayout  # what an upload is validated against
    model: ServedModel
    base_template: ChatTemplate | None  # shown as the template chat renders with


def _context(request: Request) -> AdaptersContext:
    return request.app.state.adapters


def register_adapter_routes(app: FastAPI, settings: Settings, layout: BaseLayout, model: ServedModel) -> None:
    app.state.adapters = AdaptersContext(settings, layout, model, base_chat_template(model.path))
    tags = ["adapters"]
    app.add_api_route("/adapters", list_adapters, methods=["GET"], response_model=AdapterList, tags=tags)
    app.add_api_route(
        "/adapters/{name}",
        get_adapter,
        methods=["GET"],
        response_model=AdapterInfo,
        tags=tags,
        responses={404: {}, 422: {}},
    )
    app.add_api_route(
        "/adapters/{name}/pin",
        pin_adapter,
        methods=["PUT"],
        response_model=AdapterInfo,
        tags=tags,
        responses={404: {}, 409: {}, 422: {}},
    )
    app.add_api_route(
        "/adapters/{name}/pin",
        unpin_adapter,
        methods=["DELETE"],
        response_model=AdapterInfo,
        tags=tags,
        responses={404: {}, 422: {}},
    )
    app.add_api_route(
        "/adapters/{name}",
        put_adapter,
        methods=["PUT"],
        response_model=AdapterInfo,
        tags=tags,
        responses={201: {"model": AdapterInfo}, 413: {}, 422: {}},
    )
    app.add_api_route(
        "/adapters/{name}",
        delete_adapter,
        methods=["DELETE"],
        response_model=Deleted,
        tags=tags,
        responses={404: {}, 422: {}},
    )


def _adapter_info(ctx: AdaptersContext, name: str) -> AdapterInfo:
    loaded, pinned = _loaded_adapters(ctx.settings), pins.read(ctx.settings.adapter_dir)
    return store.info(ctx.settings.adapter_dir, name, loaded, ctx.base_template, pinned)


def list_adapters(request: Request) -> AdapterList:
    """Every adapter folder in the adapter directory."""
    ctx = _context(request)
    adapter_dir = ctx.settings.adapter_dir
    loaded, pinned = _loaded_adapters(ctx.settings), pins.read(adapter_dir)
    return AdapterList(adapters=store.list_infos(adapter_dir, loaded, ctx.base_template, pinned))


def get_adapter(name: str, request: Request) -> AdapterInfo:
    return _adapter_info(_context(request), name)


def pin_adapter(name: str, request: Request) -> AdapterInfo:
    """Keep the adapter loaded: the generation worker loads its current version at once and never
    evicts it (also after a restart). 409 when more adapters would be pinned than
    ``--max-loaded-adapters`` holds."""
    ctx = _context(request)
    adapter_dir = ctx.settings.adapter_dir
    store.check_name(name)
    if not store.exists(adapter_dir, name):
        raise store.adapter_not_found(name)
    pins.pin(adapter_dir, name, ctx.settings.max_loaded_adapters)
    return _adapter_info(ctx, name)


def unpin_adapter(name: str, request: Request) -> AdapterInfo:
    """Let the adapter be evicted again (least recently used first)."""
    ctx = _context(request)
    store.check_name(name)
    pins.unpin(ctx.settings.adapter_dir, name)
    return _adapter_info(ctx, name)


async def put_adapter(name: str, request: Request) -> JSONResponse:
    """Upload a PEFT LoRA adapter: multipart ``adapter_config``, ``adapter_model``, optional ``template``
    and ``pinned`` (``true``: pin it, as ``PUT /adapters/{name}/pin``; ``false``: unpin it).

    Validated against the base before anything is written, then published atomically: a bad
    upload leaves the previous version serving. A replaced version stays servable as
    ``name@<version id>`` (the server keeps ``keep_adapter_versions`` earlier versions).
    """
    ctx = _context(request)
    settings, adapter_dir = ctx.settings, ctx.settings.adapter_dir
    store.check_name(name)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise ApiError(
            413, "payload_too_large", f"the upload is larger than {settings.max_upload_bytes} bytes"
        )
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(
            422, "invalid_upload", "send multipart/form-data with adapter_config and adapter_model"
        )
    # Read with the cap first: a chunked body has no Content-Length, and the form parser alone
    # would spool any amount of it to temporary files before the size check below.
    raw = await read_capped(
        request,
        settings.max_upload_bytes + MULTIPART_OVERHEAD,
        "the upload",
        f" (adapter files up to {settings.max_upload_bytes} bytes, plus multipart framing)",
    )
    try:
        form = await MultiPartParser(request.headers, _chunks(raw), max_files=4, max_fields=8).parse()
    except MultiPartException as exc:
        raise ApiError(
            400, "invalid_multipart", f"could not read the multipart upload: {exc.message}"
        ) from None
    try:
        config_raw = await _form_file(form, "adapter_config")
        weights_raw = await _form_file(form, "adapter_model")
        template_field = await _form_text(form, "template")
        pinned = _flag(await _form_text(form, "pinned"), "pinned")
    finally:
        await form.close()
    if len(config_raw) + len(weights_raw) > settings.max_upload_bytes:
        raise ApiError(
            413, "payload_too_large", f"the upload is larger than {settings.max_upload_bytes} bytes"
        )
    template = store.parse_template(template_field)
    if pinned:  # before anything is written: a refused pin leaves no adapter behind
        pins.check_room(adapter_dir, name, settings.max_loaded_adapters)

    def validate_and_publish() -> bool:
        store.validate_upload(config_raw, weights_raw, ctx.layout)
        return store.publish(
            adapter_dir,
            name,
            config_raw,
            weights_raw,
            template,
            ctx.model.name,
            settings.keep_adapter_versions,
        )

    created = await asyncio.to_thread(validate_and_publish)
    if pinned:
        pins.pin(adapter_dir, name, settings.max_loaded_adapters)
    elif pinned is False:
        pins.unpin(adapter_dir, name)
    info = _adapter_info(ctx, name)
    return JSONResponse(info.model_dump(), status_code=201 if created else 200)


def delete_adapter(name: str, request: Request) -> Deleted:
    """Remove an adapter; requests already running on it finish."""
    adapter_dir = _context(request).settings.adapter_dir
    store.delete(adapter_dir, name)
    pins.unpin(adapter_dir, name)  # a pin on a deleted adapter would hold a slot of the limit
    return Deleted(deleted=name)


async def _chunks(data: bytes):
    yield data


async def _form_text(form, field: str) -> str | None:
    value = form.get(field)
    if value is not None and not isinstance(value, str):
        value = (await value.read()).decode("utf-8", "replace")
    return value


def _flag(value: str | None, field: str) -> bool | None:
    """A form field's boolean (true/false, 1/0, yes/no); None when absent or empty."""
    if value is None or value.strip() == "":
        return None
    text = value.strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ApiError(422, "invalid_upload", f"{field} must be true or false, not {value[:40]!r}", field)


async def _form_file(form, field: str) -> bytes:
    value = form.get(field)
    if value is None:
        raise ApiError(422, "invalid_upload", f"the upload needs a file field {field!r}", field)
    if isinstance(value, UploadFile):
        return await value.read()
    return value.encode()
