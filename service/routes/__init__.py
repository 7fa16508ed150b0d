"""The service's HTTP routes, one module per group; ``service.app`` assembles them.

generate.py  POST /generate (and its 503 stand-in in the ``runner`` role)
openai.py    /v1/models, /v1/completions, /v1/chat/completions
adapters.py  GET /adapters, GET|PUT|DELETE /adapters/{name} (the multipart upload)
jobs.py      /train*, /datasets
files.py     /v1/files* (OpenAI's Files API over the datasets)
fine_tuning.py  /v1/fine_tuning/jobs* (OpenAI's fine-tuning API over the native jobs)
health.py    GET /health, /health/ready, /metrics
console.py   GET /ui (the web console's static files, service/console/)
"""

from __future__ import annotations

import json
from typing import Any

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of streams
SSE_DONE = "data: [DONE]\n\n"  # the end of a generation stream (OpenAI's convention)


def sse(data: Any, event_id: int | None = None, *, compact: bool = False) -> str:
    """One Server-Sent Event: ``data`` as JSON (already-serialised text as is), with an ``id`` when
    given (``Last-Event-ID`` resumes after it)."""
    if not isinstance(data, str):
        data = json.dumps(data, separators=(",", ":") if compact else None)
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {data}\n\n"
