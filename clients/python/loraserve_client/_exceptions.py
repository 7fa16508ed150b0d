"""Exceptions raised by the client.

LoraserveError
 ├── APIConnectionError          the server was not reached, or the connection broke
 │    └── APITimeoutError        connect, read, write or pool timeout
 ├── APIStatusError              the server answered 4xx/5xx; carries its error envelope
 │    ├── BadRequestError        400, 422
 │    ├── AuthenticationError    401, 403
 │    ├── NotFoundError          404 (unknown adapter, job or dataset)
 │    ├── ConflictError          409 (adapter exists and overwrite is false)
 │    ├── PayloadTooLargeError   413
 │    └── OverloadedError        429, 503 (``retry_after`` from the Retry-After header)
 ├── JobFailedError              ``wait()`` saw the job end failed or cancelled
 └── JobTimeoutError             ``wait(timeout=...)`` ran out before the job ended
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from .types import Job


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), or None when absent or unreadable."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class LoraserveError(Exception):
    """Base of every error this package raises on purpose."""


class APIConnectionError(LoraserveError):
    def __init__(self, message: str, *, request: httpx.Request | None = None, sent: bool = True):
        super().__init__(message)
        self.request = request
        # False when the request never left this machine (connect failed): always safe to retry.
        self.sent = sent


class APITimeoutError(APIConnectionError):
    pass


class APIStatusError(LoraserveError):
    """The server answered with an error status. ``code``, ``message`` and ``param`` come from its envelope
    ``{"error": {"code", "message", "param", "type"}}``."""

    def __init__(
        self,
        status_code: int,
        code: str | None,
        message: str,
        param: str | None = None,
        *,
        type: str | None = None,
        response: httpx.Response | None = None,
        body: Any = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.param = param
        self.type = type
        self.response = response
        self.body = body

    @property
    def retry_after(self) -> float | None:
        """Seconds from the response's Retry-After header, if it has a usable one."""
        return parse_retry_after(self.response.headers) if self.response is not None else None

    def __str__(self) -> str:
        head = f"{self.status_code} {self.code}" if self.code else str(self.status_code)
        tail = f" (param: {self.param})" if self.param else ""
        return f"{head}: {self.message}{tail}"


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class ConflictError(APIStatusError):
    pass


class PayloadTooLargeError(APIStatusError):
    pass


class OverloadedError(APIStatusError):
    pass


class JobFailedError(LoraserveError):
    """The job ended ``failed`` or ``cancelled``; ``job`` is its final state."""

    def __init__(self, job: Job):
        reason = f": {job.error}" if job.error else ""
        super().__init__(f"job {job.job_id} ({job.adapter}) {job.status}{reason}")
        self.job = job


class JobTimeoutError(LoraserveError, TimeoutError):
    """``job`` is the last state seen (None if the server never answered)."""

    def __init__(self, job_id: str, job: Job | None, timeout: float):
        state = job.status if job is not None else "unknown"
        super().__init__(f"job {job_id} still {state} after waiting {timeout:g}s")
        self.job = job


STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    422: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    429: OverloadedError,
    503: OverloadedError,
}
