"""Async httpx load generator: N closed-loop clients over a shared list of requests.

Each client takes the next request, sends it, waits for the answer, and takes the next one,
until the list or the time bound runs out. Requests still running at the time bound get
``drain_s`` more seconds to finish, then are cancelled and counted as censored. Throughput is
generated tokens of finished requests divided by the time from start to the last finish.
With ``stream`` the request asks for Server-Sent Events and the first non-empty delta gives
the time to first token (TTFT); a server that answers plain JSON instead has no TTFT.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import httpx

from bench.common import summarize
from bench.workload import Request


@dataclass
class Result:
    idx: int
    adapter: str | None
    max_new_tokens: int
    start: float  # seconds since the run began
    end: float | None = None
    ttft: float | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    status: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    streamed: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.end is not None

    @property
    def latency(self) -> float | None:
        return None if self.end is None else self.end - self.start


@dataclass
class LoadRun:
    label: str
    concurrency: int
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0  # start to last finish
    censored: int = 0  # still running at the time bound + drain, cancelled
    foreign_cores: float | None = None
    cpu_s: float | None = None  # CPU seconds the server's process tree used meanwhile

    def ok(self) -> list[Result]:
        return [r for r in self.results if r.ok]

    def summary(self) -> dict:
        ok = self.ok()
        tokens = sum(r.completion_tokens or 0 for r in ok)
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "requests_ok": len(ok),
            "requests_failed": len([r for r in self.results if not r.ok and r.end is not None]),
            "censored": self.censored,
            "wall_s": round(self.wall, 3),
            "generated_tokens": tokens,
            "tokens_per_s": tokens / self.wall if self.wall > 0 else None,
            "requests_per_s": len(ok) / self.wall if self.wall > 0 else None,
            "latency_s": summarize([r.latency for r in ok]),
            "ttft_s": summarize(ttfts) if ttfts else None,
            "ttft_available": bool(ttfts),
            "foreign_cores": self.foreign_cores,
            "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 2),
            # on a shared machine the CPU a method got varies from phase to phase: its tokens per CPU
            # second compare methods without that (not what a user waits for: tokens/s is)
            "tokens_per_cpu_s": tokens / self.cpu_s if self.cpu_s else None,
            "errors": sorted({r.error for r in self.results if r.error})[:5],
        }

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "requests": [
                {**asdict(r), "latency": r.latency} for r in sorted(self.results, key=lambda r: r.idx)
            ],
        }


def check_loopback(base_url: str) -> None:
    host = urlparse(base_url).hostname
    if host not in {"127.0.0.1", "localhost", "::1"}:
        raise ValueError(f"the load generator only talks to loopback, not {host!r}")


def body_for(req: Request, stream: bool) -> dict:
    return {
        "prompt": req.prompt,
        "adapter": req.adapter,
        "max_new_tokens": req.max_new_tokens,
        "temperature": 0.0,
        "stream": stream,
        **(req.extra or {}),
    }


async def send_one(client: httpx.AsyncClient, req: Request, t0: float, stream: bool) -> Result:
    """Send one request and time it; errors are recorded, never raised."""
    res = Result(req.idx, req.adapter, req.max_new_tokens, start=time.perf_counter() - t0)
    try:
        async with client.stream("POST", "/generate", json=body_for(req, stream)) as resp:
            res.status = resp.status_code
            ctype = resp.headers.get("content-type", "")
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {body[:200]}"
            elif "text/event-stream" in ctype:
                res.streamed = True
                await _read_sse(resp, res, t0)
            else:
                data = json.loads(await resp.aread())
                _take_usage(res, data)
                res.finish_reason = data.get("finish_reason")
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    res.end = time.perf_counter() - t0
    return res


async def _read_sse(resp: httpx.Response, res: Result, t0: float) -> None:
    deltas = 0
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        data = json.loads(payload)
        if "error" in data:
            res.error = f"stream error: {json.dumps(data['error'])[:200]}"
            return
        if data.get("text"):
            deltas += 1
            if res.ttft is None:
                res.ttft = time.perf_counter() - t0 - res.start
        if data.get("usage"):
            _take_usage(res, data)
        if data.get("finish_reason"):
            res.finish_reason = data["finish_reason"]
    if res.completion_tokens is None:  # no usage in the stream: one delta per token
        res.completion_tokens = deltas


def _take_usage(res: Result, data: dict) -> None:
    usage = data.get("usage") or {}
    res.completion_tokens = usage.get("completion_tokens")
    res.prompt_tokens = usage.get("prompt_tokens")


async def run_load(
    base_url: str,
    requests: list[Request],
    *,
    concurrency: int,
    duration_s: float,
    drain_s: float = 120.0,
    stream: bool = True,
    label: str = "",
    headers: dict | None = None,
    stop: asyncio.Event | None = None,
) -> LoadRun:
    """Run ``concurrency`` closed-loop clients over ``requests`` for at most ``duration_s`` (+ drain),
    or until ``stop`` is set (clients then take no new request; running ones finish)."""
    check_loopback(base_url)
    run = LoadRun(label=label, concurrency=concurrency)
    queue = list(reversed(requests))
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    t0 = time.perf_counter()
    deadline = duration_s
    inflight: dict[int, Result] = {}

    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits, headers=headers) as client:

        async def worker() -> None:
            while queue and time.perf_counter() - t0 < deadline and not (stop and stop.is_set()):
                req = queue.pop()
                inflight[req.idx] = Result(req.idx, req.adapter, req.max_new_tokens, time.perf_counter() - t0)
                res = await send_one(client, req, t0, stream)
                inflight.pop(req.idx, None)
                run.results.append(res)

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        try:
            done, pending = await asyncio.wait(tasks, timeout=duration_s + drain_s)
        finally:  # also on Ctrl-C: no client may outlive the run
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if not t.cancelled():
                t.result()  # a bug in the generator itself should not pass silently
    run.censored = len(inflight)
    ends = [r.end for r in run.results if r.ok]
    run.wall = max(ends) if ends else time.perf_counter() - t0
    return run


async def probe_streaming(base_url: str, adapter: str | None, headers: dict | None = None) -> bool:
    """True when the server answers ``"stream": true`` with Server-Sent Events carrying text."""
    req = Request(-1, "Say hello.", adapter, 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, headers=headers) as client:
        res = await send_one(client, req, time.perf_counter(), stream=True)
    return res.ok and res.streamed and res.ttft is not None
