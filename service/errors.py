"""One error shape for every 4xx/5xx (OpenAI's envelope, so OpenAI clients read it too), and the one
table from a domain error code (the generation worker's, the jobs domain's) to its HTTP status.

{"error": {"code": "adapter_not_found", "message": "...", "param": "adapter", "type": "..."}}

The domains below the routes report a code, never a status: the worker a ``service.wire.WireError``,
the jobs domain a ``service.jobs.model.JobError``. ``DOMAIN_ERRORS`` decides what each becomes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.jobs.model import JobError

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


@dataclass(frozen=True)
class ErrorKind:
    status: int
    retry_after: int | None = None  # seconds, sent as Retry-After: the condition passes by itself


# Every domain error code, with its status. A code missing here (one a newer engine might add) is a
# server-side failure: 500.
DOMAIN_ERRORS: dict[str, ErrorKind] = {
    # the generation worker (service.wire.WireError)
    "adapter_not_found": ErrorKind(404),  # e.g. deleted between acceptance and admission
    "prompt_too_long": ErrorKind(400),
    "invalid_adapter": ErrorKind(422),  # the adapter exists but cannot be loaded: its fault, not ours
    "invalid_request": ErrorKind(422),  # sampling parameters the engine refused; a malformed job request
    "timeout": ErrorKind(504),  # the request's deadline passed
    "generation_failed": ErrorKind(500),  # the engine, or LitServe's transport, failed
    # the worker that had the request died; a new one is starting (the API side sends this)
    "worker_restarted": ErrorKind(503, retry_after=5),
    # pinned adapters take every slot of the adapter cache: an unpinned one can never load
    "adapter_cache_full": ErrorKind(409),
    # the adapters (service.adapters)
    "adapter_pin_limit": ErrorKind(409),  # pinning more adapters than --max-loaded-adapters holds
    "adapter_source_failed": ErrorKind(502),  # --adapter-source answered an error or could not be reached
    "adapter_source_timeout": ErrorKind(504),  # --adapter-source did not answer in time
    "adapter_checksum_mismatch": ErrorKind(422),  # fetched weights differ from their loraserve.json sha256
    # the jobs domain (service.jobs.model.JobError)
    "job_not_found": ErrorKind(404),
    "dataset_not_found": ErrorKind(404),
    "file_not_found": ErrorKind(404),  # OpenAI's files API: a dataset id
    "job_finished": ErrorKind(409),  # cancel of a job that succeeded or failed; pause/resume of an ended job
    "job_cancelling": ErrorKind(409),  # pause of a running job that is being cancelled
    "adapter_busy": ErrorKind(409),  # a job for the adapter is queued or running
    "adapter_exists": ErrorKind(409),  # without overwrite
    "idempotency_key_reused": ErrorKind(422),
    "invalid_adapter_name": ErrorKind(422),
    "invalid_adapter_version": ErrorKind(422),  # init_adapter "name@<not 8+ hex digits>"
    "init_adapter_mismatch": ErrorKind(422),  # a warm start's base, rank, alpha or targets differ
    "invalid_config": ErrorKind(422),
    "unknown_config_key": ErrorKind(422),
    "invalid_data": ErrorKind(422),
    "invalid_row": ErrorKind(422),
    "invalid_json": ErrorKind(422),
    "invalid_text": ErrorKind(422),
    "job_store_unavailable": ErrorKind(503, retry_after=5),  # the database is down or unreachable
}


def http_status(code: str) -> int:
    """The HTTP status for a domain error code; 500 for a code the table does not know."""
    kind = DOMAIN_ERRORS.get(code)
    return kind.status if kind is not None else 500


def domain_error(code: str, message: str, param: str | None = None) -> ApiError:
    """The ApiError a route answers for a domain error code (its status and Retry-After from the table)."""
    kind = DOMAIN_ERRORS.get(code)
    retry = kind.retry_after if kind is not None else None
    headers = {"Retry-After": str(retry)} if retry is not None else None
    return ApiError(http_status(code), code, message, param, headers=headers)


def job_error(exc: JobError) -> ApiError:
    return domain_error(exc.code, exc.message, exc.param)


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

    @app.exception_handler(JobError)
    async def _job_error(_: Request, exc: JobError) -> JSONResponse:
        err = job_error(exc)
        return error_response(err.status, err.code, err.message, err.param, err.headers)

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
