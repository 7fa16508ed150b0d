"""One error shape for every 4xx/5xx: OpenAI's envelope, so OpenAI clients read it too.

{"error": {"code": "adapter_not_found", "message": "...", "param": "adapter", "type": "..."}}
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """Raise from a route to answer with the envelope. ``headers`` (e.g. Retry-After) are kept."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": message,
            "param": param,
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        }
    }


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, param), status_code=status, headers=headers)


def not_utf8_message(exc: UnicodeDecodeError) -> str:
    """What to tell a client whose JSON body is not UTF-8 (JSON on the wire is UTF-8, RFC 8259)."""
    bad = exc.object[exc.start : exc.start + 4].hex(" ")
    return f"the request body is not valid UTF-8 JSON: {exc.reason} at byte {exc.start} ({bad})"


def _nesting_too_deep() -> JSONResponse:
    return error_response(
        422, "nesting_too_deep", "the request holds JSON nested too deeply to read; flatten it"
    )


def _loc_to_param(loc: tuple | list) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    """Map FastAPI/Starlette errors and ApiError onto the envelope."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _loc_to_param(first.get("loc", ()))
        msg = "; ".join(
            f"{_loc_to_param(e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5]
        )
        return error_response(422, "invalid_request", msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI turns any failure while parsing a JSON body into a generic 400 "There was an
        # error parsing the body"; the cause it chains says what was wrong.
        if isinstance(exc.__cause__, UnicodeDecodeError):
            return error_response(422, "invalid_json", not_utf8_message(exc.__cause__))
        if isinstance(exc.__cause__, RecursionError):
            return _nesting_too_deep()
        detail = exc.detail
        if isinstance(detail, dict) and "error" in detail:
            return JSONResponse(detail, status_code=exc.status_code, headers=exc.headers)
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return error_response(exc.status_code, code, str(detail), None, exc.headers)

    @app.exception_handler(RecursionError)
    async def _too_deep(_: Request, exc: RecursionError) -> JSONResponse:
        # Only parsing what a client sent recurses without bound (json.loads of '[[[[...' in a
        # /train body, a dataset line, an adapter config, a safetensors header or a template).
        return _nesting_too_deep()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette still logs the traceback; the client gets the envelope, not a text/plain 500,
        # and no internals (paths, values) in the message.
        return error_response(
            500, "internal_error", f"the server failed to handle this request ({type(exc).__name__})"
        )
