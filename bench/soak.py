"""Soak test: sustained mixed load on a real server over loopback, then proof that nothing leaked.

    python -m bench.soak                                  # 64 clients, 10 minutes, 20 adapters, chaos
    python -m bench.soak --clients 16 --duration 15 --adapters 5 --no-chaos --json out.json

It starts ``python -m service`` on a free loopback port (its own process group, a tiny random-weight
GPT-2 unless ``--model`` names a folder, two API processes), then for ``--duration`` seconds runs:
  * ``--clients`` concurrent clients, each sending /generate requests back to back (random adapter or
    the base, random length, a fifth of them streamed);
  * one churn client that uploads new versions of some adapters and deletes and re-creates others;
  * training jobs one after another (each must succeed; the one still running at the end is cancelled);
  * a sampler of the resident memory of the server's processes (the trainer children, in their own
    sessions, are not counted: a training job is not a leak);
  * chaos (unless ``--no-chaos``): ``kill -9`` of the generation worker at 15 % of the load (the server
    heals in place) and of the running job's trainer at 50 % (that job must end ``failed``).
Clients mix /generate (a fifth streamed, some dropped after the first event), /v1/completions and
/v1/chat/completions.
Every request is checked: success, or a designed 503/429 with Retry-After (404 only for an adapter
the churn client may just have deleted); a transport error, a timeout or any other status is a
violation. Afterwards: no request left running or waiting, at most ``max_loaded_adapters`` adapters
in memory, a burst of exactly ``max_in_flight`` requests is admitted whole (no leaked in-flight slot),
every adapter still answers (no leaked adapter pin), resident memory grew less than 10 %, and the
counters of ``/metrics`` equal what the client counted, request by request and token by token, every
adapter serves the version last published (no half-published one), every training job is listed once
and ran once, and the adapter cache's pins are back to 0.

Loopback only, bounded in time and count; it stops by itself. Progress is JSON lines on stderr; the
result is one JSON object on stdout (and in ``--json``); the exit status is 0 only when every check
passed. ``tests/test_reliability_load.py`` runs a short version against a server it starts itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import promstats
from bench.adapters import base_shape, ensure_base, lora_files, upload_files
from bench.common import REPO, log, trainer_pid
from bench.servers import child_env, free_port, launch

TINY_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256}
DESIGNED_REFUSALS = (429, 503)
RETRY_AFTER_S = 1.0  # what the server sends; the client library honours it the same way
# Rows in the trainer's prompt/response format; the job is only there to keep a trainer busy.
TRAIN_ROWS = [
    {"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
    for a in range(4)
    for b in range(4)
]
TRAIN_CONFIG = {
    "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
    "training": {"num_train_epochs": 2, "eval_fraction": 0, "save_steps": 0, "max_seq_length": 64},
}


# --- the server ------------------------------------------------------------------------------------


@dataclass
class ServerSettings:
    """What the soak needs to know about the server's limits (and passes when it starts one)."""

    max_batch_size: int = 8
    max_queue: int = 24
    max_loaded_adapters: int = 8
    max_new_tokens_cap: int = 32
    request_timeout: float = 30.0
    num_api_servers: int = 2

    @property
    def max_in_flight(self) -> int:
        return self.max_batch_size + self.max_queue

    def args(self) -> list[str]:
        return [
            "--max-batch-size", str(self.max_batch_size),
            "--max-queue", str(self.max_queue),
            "--max-loaded-adapters", str(self.max_loaded_adapters),
            "--max-new-tokens-cap", str(self.max_new_tokens_cap),
            "--request-timeout", str(self.request_timeout),
            "--num-api-servers", str(self.num_api_servers),
        ]  # fmt: skip


@contextlib.contextmanager
def start_server(
    base: Path, workdir: Path, settings: ServerSettings, api_key: str
) -> Iterator[tuple[str, int]]:
    """``python -m service`` on a free loopback port; yields (url, process group id), stops it after."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "service", "--model", str(base),
        "--adapter-dir", str(workdir / "adapters"), "--data-dir", str(workdir / "data"),
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *settings.args(),
    ]  # fmt: skip
    env = child_env({"LORASERVE_API_KEY": api_key})
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the server's own metrics folder, never the caller's
    with launch("loraserve", cmd, env, port, workdir / "server.log", 180.0, stop_grace=30.0) as server:
        log("server_ready", url=server.base_url, pid=server.pid, log=str(server.log_path))
        yield server.base_url, server.pid


def group_rss(pgid: int) -> int:
    """Resident bytes of every live process in process group ``pgid``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


# --- metrics ---------------------------------------------------------------------------------------


def requests_by_route(snap: dict) -> Counter:
    """``loraserve_requests_total`` by (endpoint, status), from a ``promstats.parse`` snapshot."""
    out: Counter = Counter()
    for labels, value in snap.get("loraserve_requests_total", []):
        out[(labels["endpoint"], labels["status"])] += value
    return out


# --- the load --------------------------------------------------------------------------------------


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


@dataclass
class SoakConfig:
    clients: int = 64
    duration: float = 120.0
    adapters: int = 20
    churn: int = 4  # adapters (of ``adapters``) that the churn client replaces and deletes
    churn_every: float = 1.0
    max_new_tokens: int = 16
    stream_fraction: float = 0.2
    base_fraction: float = 0.1
    train: bool = True
    warmup_fraction: float = 0.25  # memory baseline: the median over the window after this much load
    client_timeout: float = 90.0  # a request without an answer by then hangs (server deadline + margin)
    openai_fraction: float = 0.2  # requests sent to /v1/completions and /v1/chat/completions
    disconnect_fraction: float = 0.05  # streams the client drops after the first event
    kill_worker_at: float | None = None  # kill -9 the generation worker at this fraction of the load
    kill_trainer_at: float | None = None  # kill -9 the running training job's trainer at this fraction
    seed: int = 0


class Load:
    """One soak run against a ready server; ``run`` returns the result dict."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        base: Path,
        pgid: int | None,
        config: SoakConfig,
        settings: ServerSettings,
        data_dir: Path | None = None,
    ) -> None:
        self.url, self.base, self.pgid = url, Path(base), pgid
        self.data_dir = data_dir  # the server's --data-dir: the worker's status file (chaos, pins)
        self.sha: dict[str, str] = {}  # adapter -> sha256 of the version last published
        self.submitted: list[str] = []  # training jobs, in order
        self.current_job: str | None = None
        self.killed_jobs: set[str] = set()
        self.chaos: dict[str, Any] = {}
        self.cfg, self.settings = config, settings
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.tally = Tally()
        self.rng = random.Random(config.seed)
        self.n_layer, self.n_embd = base_shape(base)
        self.stable = [f"soak-{i:02d}" for i in range(config.adapters - config.churn)]
        self.churned = [f"churn-{i:02d}" for i in range(config.churn)]
        self.present: set[str] = set()
        self.version = Counter()
        self.rss: list[tuple[float, int]] = []
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
                usage, done = None, False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        if event["error"].get("code") == "worker_restarted" and "worker" in self.chaos:
                            self.tally.worker_lost += 1  # designed: the worker was killed
                            return 503
                        self.tally.violation(f"stream for {adapter}: {event['error']}")
                    usage = event.get("usage") or usage
                    if drop:  # the client goes away mid-stream: the server must cope
                        self.tally.disconnects += 1
                        return r.status_code
                if not done:
                    self.tally.violation(f"stream for {adapter} ended without [DONE]")
                else:
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

    # --- chaos --------------------------------------------------------------------------------
    def worker_pid(self) -> int | None:
        status = _read_json(self.data_dir / "worker-status.json") if self.data_dir else None
        return (status or {}).get("pid")

    async def chaos_loop(self, client: httpx.AsyncClient, start: float) -> None:
        """kill -9 of the generation worker, then of a running trainer, at their moments of the load."""
        cfg = self.cfg
        if cfg.kill_worker_at is not None and self.data_dir is not None:
            await asyncio.sleep(max(0.0, start + cfg.duration * cfg.kill_worker_at - time.monotonic()))
            pid = self.worker_pid()
            if pid is not None:
                self.chaos["worker"] = {"pid": pid}
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                log("chaos_kill_worker", pid=pid)
                while time.monotonic() < killed + 120:
                    await asyncio.sleep(0.2)
                    r = await client.get("/health/ready")
                    self.tally.count("/health/ready", r.status_code)  # 503 while the model reloads
                    if r.status_code == 200 and self.worker_pid() not in (None, pid):
                        break
                self.chaos["worker"]["serving_again_s"] = round(time.monotonic() - killed, 2)
                log("chaos_worker_back", seconds=self.chaos["worker"]["serving_again_s"])
        if cfg.kill_trainer_at is not None and cfg.train:
            await asyncio.sleep(max(0.0, start + cfg.duration * cfg.kill_trainer_at - time.monotonic()))
            while time.monotonic() < self.stop_at:
                job_id = self.current_job
                pid = trainer_pid(job_id) if job_id else None
                if pid is not None and job_id is not None:
                    self.killed_jobs.add(job_id)
                    os.kill(pid, signal.SIGKILL)
                    self.chaos["trainer"] = {"pid": pid, "job": job_id}
                    log("chaos_kill_trainer", pid=pid, job=job_id)
                    return
                await asyncio.sleep(0.2)

    def sample_memory(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            if self.pgid is not None:
                self.rss.append((time.monotonic(), group_rss(self.pgid)))

    # --- the run -------------------------------------------------------------------------------
    async def _run(self) -> dict[str, Any]:
        cfg, settings = self.cfg, self.settings
        limits = httpx.Limits(max_connections=cfg.clients + 16, max_keepalive_connections=cfg.clients + 16)
        timeout = httpx.Timeout(cfg.client_timeout, connect=10.0)
        async with httpx.AsyncClient(
            base_url=self.url, headers=self.headers, limits=limits, timeout=timeout
        ) as c:
            before = promstats.parse((await c.get("/metrics")).text)
            self.tally.count("/metrics", 200)
            for name in self.stable + self.churned:
                await self.upload(c, name)
            for name in [None, *self.stable]:  # every adapter once: the cache reaches its steady state
                await self.generate(c, name, 2, False)
            log("warm", adapters=len(self.present))

            start = time.monotonic()
            self.stop_at = start + cfg.duration
            stop_sampler = threading.Event()
            sampler = threading.Thread(target=self.sample_memory, args=(stop_sampler,), daemon=True)
            sampler.start()
            actors = [self.client_loop(c, cfg.seed * 1000 + i) for i in range(cfg.clients)]
            actors.append(self.churn_loop(c))
            if cfg.train:
                actors.append(self.train_loop(c))
            actors.append(self.chaos_loop(c, start))

            async def progress() -> None:
                while time.monotonic() < self.stop_at:
                    await asyncio.sleep(min(10.0, max(1.0, cfg.duration / 6)))
                    log(
                        "progress",
                        elapsed=round(time.monotonic() - start, 1),
                        generated=self.tally.generated,
                        refused=self.tally.refused,
                        violations=len(self.tally.violations),
                        rss_mib=round(self.rss[-1][1] / 2**20, 1) if self.rss else None,
                    )

            await asyncio.gather(*actors, progress())
            stop_sampler.set()
            sampler.join(5)
            elapsed = time.monotonic() - start
            log("load_done", elapsed=round(elapsed, 1), generated=self.tally.generated)

            leaks = await self.check_leaks(c)
            after = promstats.parse((await c.get("/metrics")).text)  # counted by the server after it answers
        counters = self.compare_counters(before, after)
        memory = self.memory_growth(start, cfg.duration)
        violations = list(self.tally.violations)
        ok = not violations and leaks["ok"] and counters["ok"] and memory["ok"]
        return {
            "ok": ok,
            "config": asdict(cfg),
            "server": asdict(settings) | {"max_in_flight": settings.max_in_flight},
            "elapsed_s": round(elapsed, 1),
            "generated": self.tally.generated,
            "refused_503_429": self.tally.refused,
            "tokens": self.tally.tokens,
            "tokens_per_s": round(self.tally.tokens / elapsed, 1),
            "latency_s": _summary(self.tally.latencies),
            "uploads": self.tally.uploads,
            "deletes": self.tally.deletes,
            "disconnects": self.tally.disconnects,
            "streams_ended_by_worker_restart": self.tally.worker_lost,
            "cancels_that_lost_the_race": self.tally.late_cancels,
            "chaos": self.chaos,
            "jobs": dict(self.tally.jobs),
            "responses": {f"{r} {s}": n for (r, s), n in sorted(self.tally.responses.items())},
            "violations": violations,
            "leaks": leaks,
            "counters": counters,
            "memory": memory,
        }

    async def check_leaks(self, c: httpx.AsyncClient) -> dict[str, Any]:
        """After the load: nothing running or waiting, the cache within its bound, every slot free."""
        problems: list[str] = []
        await asyncio.sleep(1.5)  # the worker publishes its gauges on its next loop pass
        m = promstats.parse((await c.get("/metrics")).text)
        self.tally.count("/metrics", 200)
        running = promstats.total(m, "loraserve_num_requests_running")
        waiting = promstats.total(m, "loraserve_num_requests_waiting")
        loaded = promstats.total(m, "loraserve_num_loaded_lora_adapters")
        if running or waiting:
            problems.append(f"after the load {running:.0f} requests still running, {waiting:.0f} waiting")
        if loaded > self.settings.max_loaded_adapters:
            problems.append(f"{loaded:.0f} adapters loaded, more than max_loaded_adapters")
        # Exactly max_in_flight at once: a slot lost to a request that never released it shows as a 503.
        burst = await asyncio.gather(
            *(
                self.generate(c, self.stable[i % len(self.stable)], 1, False)
                for i in range(self.settings.max_in_flight)
            )
        )
        refused = sum(1 for s in burst if s != 200)
        if refused:
            problems.append(
                f"{refused} of a burst of {len(burst)} (= max_in_flight) requests were not admitted"
            )
        # Every adapter answers: one whose cache entry stayed pinned would wait until the deadline.
        for name in self.stable + sorted(self.present & set(self.churned)):
            if await self.generate(c, name, 1, False) != 200:
                problems.append(f"adapter {name} does not answer after the load")
        # No adapter half-published: each serves exactly the version last uploaded.
        for name in sorted(self.present):
            r = await self.call(c, "GET", f"/adapters/{name}", "/adapters/{name}", (200,))
            if r is None or r.status_code != 200 or r.json().get("sha256") != self.sha[name]:
                problems.append(f"adapter {name} is not the version last published")
        # No job lost or run twice: every submitted job listed once, and claimed once.
        r = await self.call(c, "GET", "/train", "/train", (200,), params={"limit": 1000})
        listed = (
            Counter(j["job_id"] for j in r.json()["jobs"]) if r is not None and r.status_code == 200 else {}
        )
        attempts = {j["job_id"]: j["attempts"] for j in r.json()["jobs"]} if listed else {}
        for job_id in self.submitted:
            if listed.get(job_id) != 1:
                problems.append(f"job {job_id} listed {listed.get(job_id, 0)} times")
            elif attempts.get(job_id) != 1:
                problems.append(f"job {job_id} ran {attempts.get(job_id)} times")
        # Adapter cache references of running rows back to 0 once idle (published when the worker turns idle).
        await asyncio.sleep(1.0)
        status = _read_json(self.data_dir / "worker-status.json") if self.data_dir else None
        pins = (status or {}).get("adapter_pins")
        if self.data_dir is not None and pins != 0:
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
            "jobs_listed_once": all(listed.get(j) == 1 for j in self.submitted),
        }

    def compare_counters(self, before: dict, after: dict) -> dict[str, Any]:
        seen = requests_by_route(after)
        seen.subtract(requests_by_route(before))
        server = {f"{r} {s}": int(n) for (r, s), n in seen.items() if n}
        client = {f"{r} {s}": n for (r, s), n in self.tally.responses.items() if n}
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
        timed_out = any(status == "504" for (_, status) in self.tally.responses)
        timed_out = timed_out or self.tally.disconnects > 0 or "worker" in self.chaos
        tokens_ok = int(tokens) >= self.tally.tokens if timed_out else int(tokens) == self.tally.tokens
        ok = not mismatch and tokens_ok and jobs == dict(self.tally.jobs)
        return {
            "ok": ok,
            "requests_mismatch (client, server)": {k: list(v) for k, v in sorted(mismatch.items())},
            "tokens_client": self.tally.tokens,
            "tokens_server": int(tokens),
            "jobs_client": dict(self.tally.jobs),
            "jobs_server": jobs,
        }

    def memory_growth(self, start: float, duration: float) -> dict[str, Any]:
        if self.pgid is None or not self.rss:
            return {"ok": True, "measured": False}
        window = max(2.0, duration * 0.1)
        base_from = start + duration * self.cfg.warmup_fraction
        first = [v for t, v in self.rss if base_from <= t < base_from + window]
        last = [v for t, v in self.rss if t >= start + duration - window]
        if not first or not last:
            return {"ok": False, "measured": False, "problem": "too few memory samples"}
        b, e = statistics.median(first), statistics.median(last)
        growth = e / b - 1
        return {
            "ok": growth < 0.10,
            "measured": True,
            "baseline_mib": round(b / 2**20, 1),
            "end_mib": round(e / 2**20, 1),
            "peak_mib": round(max(v for _, v in self.rss) / 2**20, 1),
            "growth": round(growth, 4),
            "limit": 0.10,
        }

    def run(self) -> dict[str, Any]:
        return asyncio.run(self._run())


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _summary(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p95": None, "max": None}
    s = sorted(xs)
    return {
        "p50": round(s[len(s) // 2], 3),
        "p95": round(s[min(len(s) - 1, int(len(s) * 0.95))], 3),
        "max": round(s[-1], 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--adapters", type=int, default=20)
    p.add_argument("--churn", type=int, default=4, help="adapters replaced and deleted during the load")
    p.add_argument("--no-train", action="store_true", help="no training job during the load")
    p.add_argument("--api-servers", type=int, default=2)
    p.add_argument("--model", type=Path, help="a local base folder (default: a tiny random GPT-2)")
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "soak")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chaos", action="store_true", help="no kill -9 of the worker and of a trainer")
    a = p.parse_args(argv)
    if a.churn >= a.adapters:
        p.error("--churn must be smaller than --adapters")
    import shutil

    run_dir = a.workdir / time.strftime("%Y%m%d-%H%M%S")
    base = a.model or ensure_base(a.workdir, shape=TINY_SHAPE)
    settings = ServerSettings(num_api_servers=a.api_servers)
    config = SoakConfig(
        clients=a.clients,
        duration=a.duration,
        adapters=a.adapters,
        churn=a.churn,
        train=not a.no_train,
        seed=a.seed,
        kill_worker_at=None if a.no_chaos else 0.15,
        kill_trainer_at=None if a.no_chaos else 0.5,
        warmup_fraction=0.25 if a.no_chaos else 0.4,  # the memory baseline: after the worker's restart
    )
    key = "soak-" + os.urandom(8).hex()
    with start_server(base, run_dir, settings, key) as (url, pgid):
        result = Load(url, key, base, pgid, config, settings, data_dir=run_dir / "data").run()
    result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")
    if result["ok"]:
        shutil.rmtree(run_dir, ignore_errors=True)  # keep the server log only when something failed
    else:
        log("soak_failed", kept=str(run_dir))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
