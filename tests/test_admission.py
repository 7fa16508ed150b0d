"""Admission by load on the real server: once the worker has measured its decode rate, requests whose
work (with what is already in flight) cannot end before the deadline get an early 503 with
Retry-After, and the admitted ones finish: no late 504. The batch's derived capacity is on
/health/ready.

The distilgpt2 shape (random weights): the tiny base decodes too fast for any deadline to bind.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service.gateway import STATUS_EVERY_S
from testing.server import running_server

DEADLINE_S = 30.0  # generous: this CPU may decode a few tokens per second under load


def test_overload_is_an_early_503_never_a_late_504(distil_base: Path, tmp_path: Path) -> None:
    data = tmp_path / "d"
    # the cap leaves room for the request size below on a fast (quiet) machine
    args = ["--request-timeout", str(DEADLINE_S), "--max-queue", "64", "--max-new-tokens-cap", "1000"]
    with running_server(distil_base, tmp_path / "a", data, args=args) as srv, srv.client() as c:
        ready = c.get("/health/ready").json()
        batch = ready["batch"]
        assert batch["rows"] >= 1 and batch["limited_by"] in ("kv_budget", "ceiling")
        assert batch["rows"] * batch["row_tokens"] * batch["kv_bytes_per_token"] <= batch["kv_budget_bytes"]

        def rate() -> float | None:
            load = json.loads((data / "worker-status.json").read_text()).get("load") or {}
            return load.get("tokens_per_s")

        warm = {"prompt": "Count:", "max_new_tokens": 8, "temperature": 0, "raw": True}
        for _ in range(20):  # until the worker has a second of engine time to measure
            assert c.post("/generate", json=warm).status_code == 200
            if rate():
                break
        measured = rate()
        assert measured and measured > 0
        # the API process rereads the status file at most every STATUS_EVERY_S: let its copy age so
        # the burst is admitted on the rate just measured, not on the copy read before it existed
        time.sleep(2 * STATUS_EVERY_S)
        # one request of this size fits the deadline alone at the measured rate; three do not. On a
        # fast machine the context caps the size, so more requests make up the work: together they
        # need three deadlines' worth at the measured rate (the rate moves a little between reads).
        cost = min(900, max(4, int(measured * DEADLINE_S * 0.4)))
        n_requests = min(48, max(8, math.ceil(3 * DEADLINE_S * measured / cost) + 1))
        body = {"prompt": "Once upon a time", "max_new_tokens": cost, "temperature": 0, "raw": True}

        def post(_):
            t0 = time.monotonic()
            r = c.post("/generate", json=body)
            return r, time.monotonic() - t0

        with ThreadPoolExecutor(n_requests) as pool:
            results = list(pool.map(post, range(n_requests)))
        codes = sorted(r.status_code for r, _ in results)
        assert 504 not in codes, (codes, measured, cost)
        assert codes.count(200) >= 1 and codes.count(503) >= 1, (codes, measured, cost)
        for r, seconds in results:
            if r.status_code == 503:
                err = r.json()["error"]
                assert err["code"] == "overloaded" and "deadline" in err["message"], err
                assert 1 <= int(r.headers["Retry-After"]) <= 60
                assert seconds < DEADLINE_S / 3  # refused at once, not after waiting
    print(f"admission: {codes} at {measured:.0f} tokens/s, {cost} tokens each, deadline {DEADLINE_S} s")
