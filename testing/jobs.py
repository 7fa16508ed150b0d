"""Training jobs through the real HTTP API: small rows to train on, and ``wait_job``, the one poller."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

FINISHED = ("succeeded", "failed", "cancelled")
# Rows in the trainer's prompt/response format, for jobs that are only there to keep a trainer busy.
TRAIN_ROWS = [
    {"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
    for a in range(4)
    for b in range(4)
]


def finished(job: dict) -> bool:
    return job["status"] in FINISHED


def wait_job(
    client: httpx.Client,
    job_id: str,
    pred: Callable[[dict], bool] = finished,
    timeout: float = 300.0,
    what: str = "finished",
    *,
    strict: bool = True,
) -> dict:
    """Poll ``GET /train/{job_id}`` until ``pred(job)``; the last job seen is in the failure message.

    ``strict``: every poll must answer 200 (off where the job store may be away for a while, and a
    poll answers 503 then)."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        r = client.get(f"/train/{job_id}")
        if strict:
            assert r.status_code == 200, r.text
        if r.status_code == 200:
            job = r.json()
            if pred(job):
                return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not {what} within {timeout:.0f} s: {job}")
