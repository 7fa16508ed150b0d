"""``python -m bench.soak``: start a server, run one soak against it, print the result."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bench.soak
from bench.common import REPO, log
from bench.soak.config import TINY_SHAPE, ServerSettings, SoakConfig
from bench.soak.run import Load
from testing.server import running_server
from testing.weights import ensure_base


@contextlib.contextmanager
def start_server(
    base: Path, workdir: Path, settings: ServerSettings, api_key: str
) -> Iterator[tuple[str, int]]:
    """``python -m service`` on a free loopback port; yields (url, process group id), stops it after."""
    with running_server(
        base,
        workdir / "adapters",
        workdir / "data",
        api_key=api_key,
        args=settings.args(),
        ready_timeout=180.0,
        stop_grace=30.0,
        log_path=workdir / "server.log",
        check_stop=False,
    ) as server:
        log("server_ready", url=server.url, pid=server.pid, log=str(server.log_path))
        yield server.url, server.pid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=bench.soak.__doc__.split("\n\n")[0])
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
