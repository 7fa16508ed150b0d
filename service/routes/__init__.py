"""The service's HTTP routes, one module per group; ``service.app`` assembles them.

generate.py  POST /generate (and its 503 stand-in in the ``runner`` role)
openai.py    /v1/models, /v1/completions, /v1/chat/completions
eval.py      POST /eval (the base and adapters answering the same rows, scored)
adapters.py  GET /adapters, GET|PUT|DELETE /adapters/{name} (the multipart upload), PUT|DELETE .../pin
export.py    GET /adapters/{name}/export, GET /export (an adapter or a composition as a file)
jobs.py      /train*, /datasets
files.py     /v1/files* (OpenAI's Files API over the datasets)
fine_tuning.py  /v1/fine_tuning/jobs* (OpenAI's fine-tuning API over the native jobs)
health.py    GET /health, /health/ready, /metrics
console.py   GET /ui (the web console's static files, service/console/)

Each module's handlers are module-level functions; its ``register_*`` function puts what they share on
``app.state`` and adds the routes. Every Server-Sent Events stream is framed here (``sse``,
``sse_response``), once for all of them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of streams
SSE_DONE = "data: [DONE]\n\n"  # the end of a generation stream (OpenAI's convention)
SSE_PING = ": ping\n\n"  # a comment line: keeps an idle stream open through proxies, ignored by clients


def sse(data: Any, event_id: int | None = None, *, compact: bool = False) -> str:
    """One Server-Sent Event: ``data`` as JSON (already-serialised text as is), with an ``id`` when
    given (``Last-Event-ID`` resumes after it)."""
    if not isinstance(data, str):
        data = json.dumps(data, separators=(",", ":") if compact else None)
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {data}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """A 200 that streams ``events`` (already framed by ``sse``) as ``text/event-stream``."""
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
