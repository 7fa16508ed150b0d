"""API-key authentication: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

One ASGI middleware guards every path except liveness, readiness and metrics, so a route added
later cannot forget it; ``require_api_key`` is the same check as a FastAPI dependency for route
groups that want it declared (it also documents the scheme in OpenAPI). Keys are compared with
``hmac.compare_digest`` so the comparison time does not leak how much of a guess was right.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ApiError, error_response

OPEN_PATHS = frozenset({"/health", "/health/ready", "/metrics", "/ui"})
# The web console's static files (service/routes/console.py): they hold no data, and every API call
# they make carries the key.
OPEN_PREFIXES = ("/ui/",)
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="loraserve"'}


def presented_key(headers) -> str | None:
    """The key a request carries, from either header (Bearer wins when both are present)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("x-api-key")
    return key or None


def key_matches(presented: str | None, expected: str) -> bool:
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


def _problem(presented: str | None) -> tuple[str, str]:
    if presented is None:
        return (
            "missing_api_key",
            "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        )
    return "invalid_api_key", "the API key is not valid"


def make_auth_dependency(api_key: str | None) -> Callable[[Request], None]:
    """A FastAPI dependency that raises 401 unless the request carries ``api_key`` (no-op without a key)."""

    def require_api_key(request: Request) -> None:
        if api_key is None:
            return
        presented = presented_key(request.headers)
        if not key_matches(presented, api_key):
            code, message = _problem(presented)
            raise ApiError(401, code, message, headers=_CHALLENGE)

    return require_api_key


class ApiKeyMiddleware:
    """Answers 401 (in the error envelope) for every HTTP request without the key, except OPEN_PATHS."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        presented = presented_key(headers)
        if key_matches(presented, self.api_key):
            await self.app(scope, receive, send)
            return
        code, message = _problem(presented)
        await error_response(401, code, message, headers=_CHALLENGE)(scope, receive, send)
