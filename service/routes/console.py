"""GET /ui: the web console, static files shipped in the package (``service/console/``).

The console is plain HTML, CSS and ES modules that call the public HTTP API from the browser (with the
API key the user types once, kept in the tab's sessionStorage); nothing here knows about jobs or
adapters. The files are read once when the routes are registered and served from memory, so a request
touches no disk and the whole console works offline. ``ApiKeyMiddleware`` lets ``/ui`` through without
the key: the files hold no data, every call they make sends the key.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from service.errors import ApiError

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
UI_PREFIX = "/ui"
# Everything comes from this server: no CDN, no inline script; fetch only to the API beside it.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag): a new server version shows at once
}
_TYPES = {".js": "text/javascript", ".css": "text/css", ".json": "application/json"}


def load_console(root: Path = CONSOLE_DIR) -> dict[str, tuple[bytes, str, str]]:
    """Every file under ``root`` by its relative path: (content, media type, ETag)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        data = path.read_bytes()
        media = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if media.startswith("text/") or media == "application/json":
            media += "; charset=utf-8"
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        files[path.relative_to(root).as_posix()] = (data, media, etag)
    return files


@dataclass(frozen=True)
class ConsoleContext:
    """What the handlers share, set on ``app.state.console`` by ``register_console_routes``."""

    files: dict[str, tuple[bytes, str, str]]  # read once: a request touches no disk


def _context(request: Request) -> ConsoleContext:
    return request.app.state.console


def register_console_routes(app: FastAPI, root: Path = CONSOLE_DIR) -> None:
    files = load_console(root)
    if "index.html" not in files:
        raise RuntimeError(f"the console's files are missing: no index.html in {root}")
    app.state.console = ConsoleContext(files)
    app.add_api_route(UI_PREFIX, console_root, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route(
        UI_PREFIX + "/{path:path}", console_file, methods=["GET", "HEAD"], include_in_schema=False
    )


def console_root() -> RedirectResponse:
    return RedirectResponse(f"{UI_PREFIX}/", status_code=308)  # relative module paths need the slash


def console_file(path: str, request: Request) -> Response:
    found = _context(request).files.get(path or "index.html")
    if found is None:
        raise ApiError(404, "not_found", f"the console has no file '{path}'", "path")
    data, media, etag = found
    headers = dict(_HEADERS, ETag=etag)
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media, headers=headers)
