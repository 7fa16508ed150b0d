"""What must hold after the load: no leak (requests, slots, adapter pins, memory), every adapter the
version last published, every job listed and run once, and the server's counters equal the clients'."""

from __future__ import annotations

import asyncio
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench import promstats
from bench.soak.traffic import Tally, Traffic


def requests_by_route(snap: dict) -> Counter:
    """``loraserve_requests_total`` by (endpoint, status), from a ``promstats.parse`` snapshot."""
    out: Counter = Counter()
    for labels, value in snap.get("loraserve_requests_total", []):
        out[(labels["endpoint"], labels["status"])] += value
    return out


async def check_leaks(traffic: Traffic, c: httpx.AsyncClient, data_dir: Path | None) -> dict[str, Any]:
    """After the load: nothing running or waiting, the cache within its bound, every slot free."""
    settings = traffic.settings
    problems: list[str] = []
    await asyncio.sleep(1.5)  # the worker publishes its gauges on its next loop pass
    m = promstats.parse((await c.get("/metrics")).text)
    traffic.tally.count("/metrics", 200)
    running = promstats.total(m, "loraserve_num_requests_running")
    waiting = promstats.total(m, "loraserve_num_requests_waiting")
    loaded = promstats.total(m, "loraserve_num_loaded_lora_adapters")
    if running or waiting:
        problems.append(f"after the load {running:.0f} requests still running, {waiting:.0f} waiting")
    if loaded > settings.max_loaded_adapters:
        problems.append(f"{loaded:.0f} adapters loaded, more than max_loaded_adapters")
    # Exactly max_in_flight at once: a slot lost to a request that never released it shows as a 503.
    burst = await asyncio.gather(
        *(
            traffic.generate(c, traffic.stable[i % len(traffic.stable)], 1, False)
            for i in range(settings.max_in_flight)
        )
    )
    refused = sum(1 for s in burst if s != 200)
    if refused:
        problems.append(f"{refused} of a burst of {len(burst)} (= max_in_flight) requests were not admitted")
    # Every adapter answers: one whose cache entry stayed pinned would wait until the deadline.
    for name in traffic.stable + sorted(traffic.present & set(traffic.churned)):
        if await traffic.generate(c, name, 1, False) != 200:
            problems.append(f"adapter {name} does not answer after the load")
    # No adapter half-published: each serves exactly the version last uploaded.
    for name in sorted(traffic.present):
        r = await traffic.call(c, "GET", f"/adapters/{name}", "/adapters/{name}", (200,))
        if r is None or r.status_code != 200 or r.json().get("sha256") != traffic.sha[name]:
            problems.append(f"adapter {name} is not the version last published")
    # No job lost or run twice: every submitted job listed once, and claimed once.
    r = await traffic.call(c, "GET", "/train", "/train", (200,), params={"limit": 1000})
    listed = Counter(j["job_id"] for j in r.json()["jobs"]) if r is not None and r.status_code == 200 else {}
    attempts = {j["job_id"]: j["attempts"] for j in r.json()["jobs"]} if listed else {}
    for job_id in traffic.submitted:
        if listed.get(job_id) != 1:
            problems.append(f"job {job_id} listed {listed.get(job_id, 0)} times")
        elif attempts.get(job_id) != 1:
            problems.append(f"job {job_id} ran {attempts.get(job_id)} times")
    # Adapter cache references of running rows back to 0 once idle (published when the worker turns idle).
    await asyncio.sleep(1.0)
    status = read_json(data_dir / "worker-status.json") if data_dir else None
    pins = (status or {}).get("adapter_pins")
    if data_dir is not None and pins != 0:
        problems.append(f"adapter cache references after the load: {pins}, expected 0")
    return {
        "ok": not problems,
        "problems": problems,
        "running": running,
        "waiting": waiting,
        "adapters_loaded": loaded,
        "burst": len(burst),
        "burst_admitted": len(burst) - refused,
        "adapter_pins": pins,
        "jobs_listed_once": all(listed.get(j) == 1 for j in traffic.submitted),
    }


def compare_counters(tally: Tally, before: dict, after: dict, worker_killed: bool) -> dict[str, Any]:
    """The server's counters (``/metrics``) against what the clients counted, request by request."""
    seen = requests_by_route(after)
    seen.subtract(requests_by_route(before))
    server = {f"{r} {s}": int(n) for (r, s), n in seen.items() if n}
    client = {f"{r} {s}": n for (r, s), n in tally.responses.items() if n}
    tokens = promstats.total(after, "loraserve_generated_tokens_total") - promstats.total(
        before, "loraserve_generated_tokens_total"
    )
    jobs = {
        s: int(
            promstats.total(after, "loraserve_train_jobs_finished_total", status=s)
            - promstats.total(before, "loraserve_train_jobs_finished_total", status=s)
        )
        for s in ("succeeded", "failed", "cancelled")
    }
    jobs = {s: n for s, n in jobs.items() if n}
    mismatch = {
        k: (client.get(k, 0), server.get(k, 0))
        for k in set(client) | set(server)
        if client.get(k, 0) != server.get(k, 0)
    }
    # A request that ran past its deadline generated tokens the client never saw: with 504s
    # (violations themselves) the server's count may only be higher.
    # So did a stream the client dropped, and a request whose worker was killed under it.
    timed_out = any(status == "504" for (_, status) in tally.responses)
    timed_out = timed_out or tally.disconnects > 0 or worker_killed
    tokens_ok = int(tokens) >= tally.tokens if timed_out else int(tokens) == tally.tokens
    ok = not mismatch and tokens_ok and jobs == dict(tally.jobs)
    return {
        "ok": ok,
        "requests_mismatch (client, server)": {k: list(v) for k, v in sorted(mismatch.items())},
        "tokens_client": tally.tokens,
        "tokens_server": int(tokens),
        "jobs_client": dict(tally.jobs),
        "jobs_server": jobs,
    }


def memory_growth(
    rss: list[tuple[float, int]], start: float, duration: float, warmup_fraction: float
) -> dict[str, Any]:
    """Resident memory at the end of the load against a baseline taken after ``warmup_fraction`` of it:
    under 10 % growth (the medians of two windows of a tenth of the load each)."""
    if not rss:
        return {"ok": True, "measured": False}
    window = max(2.0, duration * 0.1)
    base_from = start + duration * warmup_fraction
    first = [v for t, v in rss if base_from <= t < base_from + window]
    last = [v for t, v in rss if t >= start + duration - window]
    if not first or not last:
        return {"ok": False, "measured": False, "problem": "too few memory samples"}
    b, e = statistics.median(first), statistics.median(last)
    growth = e / b - 1
    return {
        "ok": growth < 0.10,
        "measured": True,
        "baseline_mib": round(b / 2**20, 1),
        "end_mib": round(e / 2**20, 1),
        "peak_mib": round(max(v for _, v in rss) / 2**20, 1),
        "growth": round(growth, 4),
        "limit": 0.10,
    }


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
