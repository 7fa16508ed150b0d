"""A size cap on request bodies, enforced as the body arrives (``max_request_bytes``).

FastAPI reads a JSON body whole and parses it before a route sees it, so without a cap a 50 MiB
``/generate`` body is received, held and parsed only to be refused by the prompt-length check.
``BodyLimitMiddleware`` answers ``413 payload_too_large`` (the error envelope, naming the limit)
before the application runs:

- a declared ``Content-Length`` over the cap is refused without reading a byte of the body;
- a body without one (chunked) is counted as it arrives and refused as soon as it passes the cap.

A body within the cap is buffered and handed on as one message, so the application reads it as
before; anything the client sends after it (``http.disconnect``) is passed through unchanged.

Every request gets the cap, so a JSON route added later is covered too, except the routes that
read their body with a larger cap of their own (``OWN_CAP``): adapter uploads
(``max_upload_bytes``), ``POST /datasets``, ``POST /v1/files`` and ``POST /train`` (``max_dataset_bytes``).
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response

# (method, full-path pattern) of the routes that cap their bodies themselves.
OWN_CAP: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("PUT", re.compile(r"/adapters/[^/]+")),
    ("POST", re.compile(r"/datasets")),
    ("POST", re.compile(r"/train")),
    ("POST", re.compile(r"/v1/files")),
)


def has_own_cap(method: str, path: str) -> bool:
    return any(method == m and pattern.fullmatch(path) for m, pattern in OWN_CAP)


def declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


class BodyLimitMiddleware:
    """413 for a request body over ``limit`` bytes, before the application reads any of it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or has_own_cap(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.limit:
            await self.refuse(str(declared), scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body: pass that on
                pending = [{"type": "http.request", "body": bytes(body), "more_body": True}, message]
                break
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self.refuse(f"more than {self.limit}", scope, receive, send)
                return
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": bytes(body), "more_body": False}]
                break
        del body

        async def replay() -> Message:
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, size: str, scope: Scope, receive: Receive, send: Send) -> None:
        message = (
            f"the request body is {size} bytes; this server accepts at most {self.limit} bytes "
            "(max_request_bytes) on this route"
        )
        await error_response(413, "payload_too_large", message)(scope, receive, send)
