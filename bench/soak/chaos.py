"""Chaos during the load: ``kill -9`` of the generation worker (the server heals in place), then of the
running training job's trainer (that job must end ``failed``)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import log
from bench.soak.checks import read_json
from bench.soak.traffic import Traffic
from testing.procs import trainer_pid


class Chaos:
    """The kills, at their moments of the load; ``events`` says what was killed and when it served again."""

    def __init__(self, traffic: Traffic, data_dir: Path | None) -> None:
        self.traffic = traffic
        self.data_dir = data_dir  # the server's --data-dir: the worker's status file names its pid
        self.events: dict[str, Any] = {}

    def worker_pid(self) -> int | None:
        status = read_json(self.data_dir / "worker-status.json") if self.data_dir else None
        return (status or {}).get("pid")

    async def run(self, client: httpx.AsyncClient, start: float) -> None:
        """kill -9 of the generation worker, then of a running trainer, at their moments of the load."""
        traffic = self.traffic
        cfg = traffic.cfg
        if cfg.kill_worker_at is not None and self.data_dir is not None:
            await asyncio.sleep(max(0.0, start + cfg.duration * cfg.kill_worker_at - time.monotonic()))
            pid = self.worker_pid()
            if pid is not None:
                self.events["worker"] = {"pid": pid}
                traffic.worker_killed = True
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                log("chaos_kill_worker", pid=pid)
                while time.monotonic() < killed + 120:
                    await asyncio.sleep(0.2)
                    r = await client.get("/health/ready")
                    traffic.tally.count("/health/ready", r.status_code)  # 503 while the model reloads
                    if r.status_code == 200 and self.worker_pid() not in (None, pid):
                        break
                self.events["worker"]["serving_again_s"] = round(time.monotonic() - killed, 2)
                log("chaos_worker_back", seconds=self.events["worker"]["serving_again_s"])
        if cfg.kill_trainer_at is not None and cfg.train:
            await asyncio.sleep(max(0.0, start + cfg.duration * cfg.kill_trainer_at - time.monotonic()))
            while time.monotonic() < traffic.stop_at:
                job_id = traffic.current_job
                pid = trainer_pid(job_id) if job_id else None
                if pid is not None and job_id is not None:
                    traffic.killed_jobs.add(job_id)
                    os.kill(pid, signal.SIGKILL)
                    self.events["trainer"] = {"pid": pid, "job": job_id}
                    log("chaos_kill_trainer", pid=pid, job=job_id)
                    return
                await asyncio.sleep(0.2)
