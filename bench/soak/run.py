"""One soak against a ready server: warm up, run the load with its chaos while sampling memory, then
the checks; ``Load.run`` returns the result (``ok`` only when every check passed)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from bench import promstats
from bench.common import log
from bench.soak.chaos import Chaos
from bench.soak.checks import check_leaks, compare_counters, memory_growth
from bench.soak.config import ServerSettings, SoakConfig
from bench.soak.traffic import Traffic
from testing.procs import group_rss


class Load:
    """The load, its chaos and its checks against the server at ``url`` (process group ``pgid``: its
    memory is sampled; ``data_dir``: its --data-dir, where the worker's status file is)."""

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
        self.url, self.pgid, self.data_dir = url, pgid, data_dir
        self.cfg, self.settings = config, settings
        self.traffic = Traffic(api_key, Path(base), config, settings)
        self.chaos = Chaos(self.traffic, data_dir)
        self.rss: list[tuple[float, int]] = []

    def sample_memory(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            if self.pgid is not None:
                self.rss.append((time.monotonic(), group_rss(self.pgid)))

    async def _run(self) -> dict[str, Any]:
        cfg, settings, traffic = self.cfg, self.settings, self.traffic
        limits = httpx.Limits(max_connections=cfg.clients + 16, max_keepalive_connections=cfg.clients + 16)
        timeout = httpx.Timeout(cfg.client_timeout, connect=10.0)
        async with httpx.AsyncClient(
            base_url=self.url, headers=traffic.headers, limits=limits, timeout=timeout
        ) as c:
            before = promstats.parse((await c.get("/metrics")).text)
            traffic.tally.count("/metrics", 200)
            for name in traffic.stable + traffic.churned:
                await traffic.upload(c, name)
            for name in [None, *traffic.stable]:  # every adapter once: the cache reaches its steady state
                await traffic.generate(c, name, 2, False)
            log("warm", adapters=len(traffic.present))

            start = time.monotonic()
            traffic.stop_at = start + cfg.duration
            stop_sampler = threading.Event()
            sampler = threading.Thread(target=self.sample_memory, args=(stop_sampler,), daemon=True)
            sampler.start()
            actors = [traffic.client_loop(c, cfg.seed * 1000 + i) for i in range(cfg.clients)]
            actors.append(traffic.churn_loop(c))
            if cfg.train:
                actors.append(traffic.train_loop(c))
            actors.append(self.chaos.run(c, start))

            async def progress() -> None:
                while time.monotonic() < traffic.stop_at:
                    await asyncio.sleep(min(10.0, max(1.0, cfg.duration / 6)))
                    log(
                        "progress",
                        elapsed=round(time.monotonic() - start, 1),
                        generated=traffic.tally.generated,
                        refused=traffic.tally.refused,
                        violations=len(traffic.tally.violations),
                        rss_mib=round(self.rss[-1][1] / 2**20, 1) if self.rss else None,
                    )

            await asyncio.gather(*actors, progress())
            stop_sampler.set()
            sampler.join(5)
            elapsed = time.monotonic() - start
            log("load_done", elapsed=round(elapsed, 1), generated=traffic.tally.generated)

            leaks = await check_leaks(traffic, c, self.data_dir)
            after = promstats.parse((await c.get("/metrics")).text)  # counted by the server after it answers
        counters = compare_counters(traffic.tally, before, after, traffic.worker_killed)
        memory = memory_growth(self.rss, start, cfg.duration, cfg.warmup_fraction)
        violations = list(traffic.tally.violations)
        ok = not violations and leaks["ok"] and counters["ok"] and memory["ok"]
        return {
            "ok": ok,
            "config": asdict(cfg),
            "server": asdict(settings) | {"max_in_flight": settings.max_in_flight},
            "elapsed_s": round(elapsed, 1),
            "generated": traffic.tally.generated,
            "refused_503_429": traffic.tally.refused,
            "tokens": traffic.tally.tokens,
            "tokens_per_s": round(traffic.tally.tokens / elapsed, 1),
            "latency_s": summary(traffic.tally.latencies),
            "uploads": traffic.tally.uploads,
            "deletes": traffic.tally.deletes,
            "disconnects": traffic.tally.disconnects,
            "streams_ended_by_worker_restart": traffic.tally.worker_lost,
            "cancels_that_lost_the_race": traffic.tally.late_cancels,
            "chaos": self.chaos.events,
            "jobs": dict(traffic.tally.jobs),
            "responses": {f"{r} {s}": n for (r, s), n in sorted(traffic.tally.responses.items())},
            "violations": violations,
            "leaks": leaks,
            "counters": counters,
            "memory": memory,
        }

    def run(self) -> dict[str, Any]:
        return asyncio.run(self._run())


def summary(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p95": None, "max": None}
    s = sorted(xs)
    return {
        "p50": round(s[len(s) // 2], 3),
        "p95": round(s[min(len(s) - 1, int(len(s) * 0.95))], 3),
        "max": round(s[-1], 3),
    }
