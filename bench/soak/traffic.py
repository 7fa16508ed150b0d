"""The load: concurrent clients, the churn client and training jobs; every response judged and counted.

A response is fine when it is what the request expects, or a designed refusal (429/503 with
Retry-After); anything else, a transport error included, is a violation. Streams are read with the
client package's SSE parsing (``loraserve_client``).
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from loraserve_client import APIStatusError
from loraserve_client._core import DONE, GenerationStreamState, SSEDecoder

from bench.common import log
from bench.soak.config import DESIGNED_REFUSALS, RETRY_AFTER_S, TRAIN_CONFIG, ServerSettings, SoakConfig
from testing.jobs import TRAIN_ROWS
from testing.weights import base_shape, lora_files, upload_files


@dataclass
class Tally:
    """What the client saw: every response by (route template, status), tokens, and every violation."""

    responses: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    tokens: int = 0
    refused: int = 0
    generated: int = 0
    latencies: list[float] = field(default_factory=list)
    jobs: Counter = field(default_factory=Counter)
    uploads: int = 0
    deletes: int = 0
    disconnects: int = 0
    worker_lost: int = 0  # streams ended by an error event worker_restarted (the worker was killed)
    late_cancels: int = 0  # cancels answered 200 whose job still ended succeeded

    def count(self, route: str, status: int | str) -> None:
        self.responses[(route, str(status))] += 1

    def violation(self, what: str) -> None:
        if len(self.violations) < 200:
            self.violations.append(what)


class Traffic:
    """The clients' side of one soak: what was published, which jobs ran, and the tally."""

    def __init__(self, api_key: str | None, base: Path, config: SoakConfig, settings: ServerSettings) -> None:
        self.sha: dict[str, str] = {}  # adapter -> sha256 of the version last published
        self.submitted: list[str] = []  # training jobs, in order
        self.current_job: str | None = None
        self.killed_jobs: set[str] = set()  # jobs whose trainer the chaos killed: they may fail
        self.worker_killed = False  # the chaos killed the generation worker: streams may end early
        self.cfg, self.settings = config, settings
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.tally = Tally()
        self.rng = random.Random(config.seed)
        self.n_layer, self.n_embd = base_shape(base)
        self.stable = [f"soak-{i:02d}" for i in range(config.adapters - config.churn)]
        self.churned = [f"churn-{i:02d}" for i in range(config.churn)]
        self.present: set[str] = set()
        self.version = Counter()
        self.stop_at = 0.0

    # --- plumbing ------------------------------------------------------------------------------
    async def call(
        self, client: httpx.AsyncClient, method: str, path: str, route: str, ok: tuple[int, ...], **kw: Any
    ) -> httpx.Response | None:
        """One request, counted under ``route``; anything but ``ok`` or a designed refusal is a violation."""
        try:
            r = await client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            self.tally.violation(f"{method} {path}: {type(exc).__name__}: {exc}")
            return None
        self.tally.count(route, r.status_code)
        self._judge(method, path, r.status_code, r.headers, r.text if r.status_code >= 300 else "", ok)
        return r

    def _judge(self, method: str, path: str, status: int, headers, text: str, ok: tuple[int, ...]) -> bool:
        if status in ok:
            return True
        if status in DESIGNED_REFUSALS:
            self.tally.refused += 1
            if "retry-after" not in headers:
                self.tally.violation(f"{method} {path}: {status} without Retry-After")
            return False
        self.tally.violation(f"{method} {path}: {status} {text[:300]}")
        return False

    async def upload(self, client: httpx.AsyncClient, name: str) -> None:
        self.version[name] += 1
        seed = zlib.crc32(f"{name}/{self.version[name]}".encode())
        config, weights = lora_files(self.n_layer, self.n_embd, seed=seed)
        expected = 200 if name in self.present else 201
        r = await self.call(
            client,
            "PUT",
            f"/adapters/{name}",
            "/adapters/{name}",
            (expected,),
            files=upload_files(config, weights),
        )
        if r is not None and r.status_code == expected:
            self.present.add(name)
            self.sha[name] = r.json()["sha256"]
            self.tally.uploads += 1

    async def delete(self, client: httpx.AsyncClient, name: str) -> None:
        self.present.discard(name)  # from now on a 404 for it is fine
        r = await self.call(client, "DELETE", f"/adapters/{name}", "/adapters/{name}", (200,))
        if r is not None and r.status_code == 200:
            self.tally.deletes += 1

    async def generate(
        self, client: httpx.AsyncClient, adapter: str | None, max_new: int, stream: bool, drop: bool = False
    ) -> int:
        """One /generate; returns its status (0 for a transport error). ``drop``: a stream the client
        closes after its first event."""
        body = {
            "prompt": "Tell me something.",
            "adapter": adapter,
            "max_new_tokens": max_new,
            "stream": stream,
        }
        ok_404 = adapter in self.churned  # the churn client may have just deleted it
        ok = (200, 404) if ok_404 else (200,)
        t0 = time.monotonic()
        if not stream:
            r = await self.call(client, "POST", "/generate", "/generate", ok, json=body)
            if r is None:
                return 0
            if r.status_code == 200:
                self._finished(r.json().get("usage"), max_new, adapter, t0)
            return r.status_code
        try:
            async with client.stream("POST", "/generate", json=body) as r:
                self.tally.count("/generate", r.status_code)
                if r.status_code != 200:
                    await r.aread()
                    self._judge(
                        "POST", f"/generate (stream, {adapter})", r.status_code, r.headers, r.text, ok
                    )
                    return r.status_code
                decoder, state, done = SSEDecoder(), GenerationStreamState(), False
                async for line in r.aiter_lines():
                    data = decoder.feed(line)
                    if data is None:
                        continue
                    try:
                        done = state.feed(data, r) is DONE
                    except APIStatusError as exc:  # an error event
                        if exc.code == "worker_restarted" and self.worker_killed:
                            self.tally.worker_lost += 1  # designed: the worker was killed
                            return 503
                        self.tally.violation(f"stream for {adapter}: {exc.code}: {exc.message}")
                    if drop and not done:  # the client goes away mid-stream: the server must cope
                        self.tally.disconnects += 1
                        return r.status_code
                if not done:
                    self.tally.violation(f"stream for {adapter} ended without [DONE]")
                else:
                    usage = state.usage.model_dump() if state.usage else None
                    self._finished(usage, max_new, adapter, t0)
                return r.status_code
        except httpx.HTTPError as exc:
            self.tally.violation(f"POST /generate (stream, {adapter}): {type(exc).__name__}: {exc}")
            return 0

    async def openai(self, client: httpx.AsyncClient, adapter: str | None, max_new: int, chat: bool) -> int:
        """One non-streamed /v1/completions or /v1/chat/completions; its status (0: transport error)."""
        model = adapter or "base"
        if chat:
            path = "/v1/chat/completions"
            body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
        else:
            path, body = "/v1/completions", {"model": model, "prompt": "Tell me something."}
        body["max_tokens"] = max_new
        ok = (200, 404) if adapter in self.churned else (200,)
        t0 = time.monotonic()
        r = await self.call(client, "POST", path, path, ok, json=body)
        if r is None:
            return 0
        if r.status_code == 200:
            self._finished(r.json().get("usage"), max_new, adapter, t0)
        return r.status_code

    def _finished(self, usage: dict | None, max_new: int, adapter: str | None, t0: float) -> None:
        self.tally.latencies.append(time.monotonic() - t0)
        self.tally.generated += 1
        n = int((usage or {}).get("completion_tokens", -1))
        if not 1 <= n <= max_new:
            self.tally.violation(f"generation for {adapter}: {n} tokens, asked for at most {max_new}")
        self.tally.tokens += max(n, 0)

    # --- actors --------------------------------------------------------------------------------
    async def client_loop(self, client: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < self.stop_at:
            roll = rng.random()
            if roll < self.cfg.base_fraction:
                adapter = None
            elif self.churned and roll < self.cfg.base_fraction + 0.15:
                adapter = rng.choice(self.churned)
            else:
                adapter = rng.choice(self.stable)
            max_new = rng.randint(1, self.cfg.max_new_tokens)
            route = rng.random()
            if route < self.cfg.openai_fraction:
                status = await self.openai(
                    client, adapter, max_new, chat=route < self.cfg.openai_fraction / 2
                )
            else:
                stream = rng.random() < self.cfg.stream_fraction
                drop = stream and rng.random() < self.cfg.disconnect_fraction / self.cfg.stream_fraction
                status = await self.generate(client, adapter, max_new, stream, drop)
            if status in DESIGNED_REFUSALS:  # a polite client waits Retry-After (1 s here), with jitter
                await asyncio.sleep(RETRY_AFTER_S * (0.5 + rng.random()))

    async def churn_loop(self, client: httpx.AsyncClient) -> None:
        i = 0
        while self.churned and time.monotonic() < self.stop_at:
            name = self.churned[i % len(self.churned)]
            if name in self.present and (i // len(self.churned)) % 2 == 1:
                await self.delete(client, name)
            else:
                await self.upload(client, name)
            i += 1
            if i % 5 == 0:
                await self.call(client, "GET", "/adapters", "/adapters", (200,))
            await asyncio.sleep(self.cfg.churn_every)

    async def train_loop(self, client: httpx.AsyncClient) -> None:
        n = 0
        while time.monotonic() < self.stop_at:
            n += 1
            body = {"adapter": f"trained-{n:02d}", "data": TRAIN_ROWS, "config": TRAIN_CONFIG}
            r = await self.call(client, "POST", "/train", "/train", (202,), json=body)
            if r is None or r.status_code != 202:
                return
            job_id = r.json()["job_id"]
            self.submitted.append(job_id)
            self.current_job = job_id
            log("train_submitted", job=job_id)
            status = await self.wait_job(client, job_id, until=self.stop_at)
            self.current_job = None
            if status is None:  # still running at the end: cancel it, it must end cancelled
                r = await self.call(client, "DELETE", f"/train/{job_id}", "/train/{job_id}", (200, 409))
                # 409 job_finished: the job ended between the last poll and the cancel, which is
                # a correct answer; it must then stay in the state it finished in.
                finished_first = r is not None and r.status_code == 409
                if finished_first and r.json()["error"]["code"] != "job_finished":
                    self.tally.violation(f"DELETE /train/{job_id}: 409 {r.text}")
                status = await self.wait_job(client, job_id, until=time.monotonic() + 60)
                # A cancel that lands while the job is publishing its adapter may lose the race: it
                # is answered 200, the job still ends succeeded (recorded as such in the result).
                late = status == "succeeded" and not finished_first
                if late:
                    self.tally.late_cancels += 1
                expected = ("succeeded", "cancelled") if finished_first or late else ("cancelled",)
                if status not in expected:
                    self.tally.violation(f"job {job_id}: {status} after cancel, expected cancelled")
            elif status != "succeeded" and not (status == "failed" and job_id in self.killed_jobs):
                self.tally.violation(f"job {job_id} ended {status}")
            if status:
                self.tally.jobs[status] += 1
            log("train_finished", job=job_id, status=status)
            if status == "succeeded":  # the new adapter answers at once
                await self.generate(client, body["adapter"], 2, False)

    async def wait_job(self, client: httpx.AsyncClient, job_id: str, until: float) -> str | None:
        while time.monotonic() < until:
            r = await self.call(client, "GET", f"/train/{job_id}", "/train/{job_id}", (200,))
            if r is None or r.status_code != 200:
                return "unknown"
            job = r.json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                if job["status"] == "failed" and job_id not in self.killed_jobs:
                    self.tally.violation(f"job {job_id} failed: {job.get('error')}")
                elif job["status"] == "failed" and "SIGKILL" not in (job.get("error") or ""):
                    self.tally.violation(f"killed job {job_id} failed for another reason: {job.get('error')}")
                return job["status"]
            await asyncio.sleep(1.0)
        return None
