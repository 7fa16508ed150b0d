"""GET /adapters/{name}/export and GET /export: an adapter (or a composition) as a file for other runtimes.

The request is checked here without torch (``trainer.export_plan``: format, names, weights, what the format
can express), the versions are resolved once and pinned, and then:

- ``peft`` zips the stored folder in memory (an adapter is a few MB) and sends it;
- ``gguf`` and ``merged`` need the base's weights and torch, which an API process never imports: they run
  as ``python -m trainer export`` in a subprocess that writes one file into a private folder under
  ``<data-dir>/exports/``, which is streamed and removed when the response ends. A subprocess rather
  than a thread keeps the merged model's memory out of the API process and returns it when it exits;
  one export runs at a time, others wait.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response, StreamingResponse

from loracore import artifact
from service.adapters import store
from service.errors import ApiError
from service.served_model import ServedModel
from service.settings import Settings
from trainer import export_plan
from trainer.export_plan import ExportError, ExportFormat, Part

CHUNK = 1 << 20
_RESPONSES = {
    200: {"content": {"application/octet-stream": {}, "application/zip": {}}},
    401: {},
    404: {},
    422: {},
}


@dataclass(frozen=True)
class ExportContext:
    """What the handlers share, set on ``app.state.export`` by ``register_export_routes``."""

    settings: Settings
    model: ServedModel
    exports_dir: Path  # the private folders the export subprocesses write into
    one_at_a_time: asyncio.Semaphore


def _context(request: Request) -> ExportContext:
    return request.app.state.export


def register_export_routes(app: FastAPI, settings: Settings, model: ServedModel) -> None:
    exports_dir = Path(settings.data_dir) / "exports"
    shutil.rmtree(exports_dir, ignore_errors=True)  # what a killed server left behind
    app.state.export = ExportContext(settings, model, exports_dir, asyncio.Semaphore(1))
    app.add_api_route(
        "/adapters/{name}/export", export_adapter, methods=["GET"], tags=["adapters"], responses=_RESPONSES
    )
    app.add_api_route("/export", export_composition, methods=["GET"], tags=["adapters"], responses=_RESPONSES)


async def export_adapter(
    name: str, request: Request, fmt: str | None = Query(None, alias="format")
) -> Response:
    """Download one adapter (``name`` or ``name@<version>``) as ``format`` = gguf, merged or peft."""
    store.check_ref(name, "name")
    return await _export(_context(request), fmt, [Part(name)], "name")


async def export_composition(
    request: Request,
    adapters: str = Query(description="name[@version][:weight],..."),
    fmt: str | None = Query(None, alias="format"),
) -> Response:
    """Download a weighted composition (``alpha:0.6,beta:0.4``) as ``format`` = gguf or merged."""
    try:
        parts = export_plan.parse_parts([adapters])
    except ExportError as exc:
        raise _api_error(exc) from None
    return await _export(_context(request), fmt, parts, "adapters")


async def _export(ctx: ExportContext, fmt_name: str | None, parts: list[Part], param: str) -> Response:
    try:
        fmt = export_plan.get_format(fmt_name)
        export_plan.check_expressible(fmt, parts, export_plan.base_model_type(ctx.model.path))
    except ExportError as exc:
        raise _api_error(exc) from None
    # Pin each version now: what is exported is what this request named, even if replaced meanwhile.
    pinned = []
    for i, part in enumerate(parts):
        where = param if param == "name" else f"adapters.{i}"
        version = store.resolve(ctx.settings.adapter_dir, part.ref, where)
        pinned.append((version, part.weight))
    filename = export_plan.download_name(fmt, parts)
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    if fmt.name == "peft":
        body = await asyncio.to_thread(export_plan.peft_zip, pinned[0][0].folder)
        return Response(body, media_type=fmt.media_type, headers=headers)
    spec = [f"{artifact.split_ref(p.ref)[0]}@{v.id}:{w!r}" for p, (v, w) in zip(parts, pinned, strict=True)]
    async with ctx.one_at_a_time:
        path = await _run_export(ctx, fmt, spec)
    headers["Content-Length"] = str(path.stat().st_size)
    return StreamingResponse(_stream_and_remove(path), media_type=fmt.media_type, headers=headers)


async def _run_export(ctx: ExportContext, fmt: ExportFormat, spec: list[str]) -> Path:
    ctx.exports_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=ctx.exports_dir))
    out = work / "export.bin"
    cmd = [sys.executable, "-m", "trainer", "export", *spec, "--adapter-dir", str(ctx.settings.adapter_dir)]
    cmd += ["--base", str(ctx.model.path), "--format", fmt.name, "--out", str(out), "--archive"]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await proc.communicate()
    except asyncio.CancelledError:  # the client went away: stop the export and clean up
        proc.kill()
        await proc.wait()
        shutil.rmtree(work, ignore_errors=True)
        raise
    if proc.returncode != 0 or not out.is_file():
        shutil.rmtree(work, ignore_errors=True)
        lines = err.decode("utf-8", "replace").strip().splitlines()
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        if proc.returncode == 2:  # the trainer's one-line user error (an adapter it cannot export)
            raise ApiError(422, "export_failed", last.removeprefix("error: "), "format")
        raise RuntimeError(f"the export subprocess failed ({proc.returncode}): {last}")
    return out


def _api_error(exc: ExportError) -> ApiError:
    return ApiError(exc.status, exc.code, str(exc), exc.param)


async def _stream_and_remove(path: Path) -> AsyncIterator[bytes]:
    try:
        with open(path, "rb") as fh:
            while block := await asyncio.to_thread(fh.read, CHUNK):
                yield block
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
