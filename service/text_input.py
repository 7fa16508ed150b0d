"""Refuse request text that is not Unicode: ``422 invalid_text`` naming the field.

A JSON body may spell a lone UTF-16 surrogate (``{"prompt": "hi \\ud800"}``). It decodes into a
Python ``str`` that the tokenizer rejects with a ``TypeError`` and a UTF-8 file with a
``UnicodeEncodeError``, both 500s; so it is refused where the body is read.

``TextMiddleware`` covers every JSON route whose body ``BodyLimitMiddleware`` buffered (so a JSON
route added later is covered too). The routes that read their own bodies (``limits.OWN_CAP``:
uploads, ``/datasets``, ``/train``) call ``check_text`` where they parse.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, error_response
from trainer.text import find_lone_surrogate

# A surrogate escape anywhere in the raw body; only then is the body parsed and walked (a pair
# such as "\ud83d\ude00" is one valid code point and passes the walk).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def check_text(value: Any, param: str = "") -> None:
    """Raise ``422 invalid_text`` for the first lone surrogate in a decoded JSON value."""
    hit = find_lone_surrogate(value, param)
    if hit:
        raise ApiError(422, "invalid_text", hit.describe(), hit.param or None)


class TextMiddleware:
    """422 for a buffered JSON body that holds a lone surrogate; runs inside BodyLimitMiddleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        first = await receive()
        body = first.get("body", b"") if first["type"] == "http.request" else b""
        # Only a whole body can be parsed; a streamed one belongs to a route that checks it itself.
        if not first.get("more_body", False) and _SURROGATE_ESCAPE.search(body):
            try:
                check_text(json.loads(body))
            except ApiError as exc:
                await error_response(exc.status, exc.code, exc.message, exc.param)(scope, receive, send)
                return
            except (ValueError, RecursionError):  # not JSON: the route answers that in its own words
                pass
        pending: list[Message] = [first]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)
