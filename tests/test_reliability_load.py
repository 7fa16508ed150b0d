"""Load against a real server with two API processes: concurrent writers of the job store through both
of them lose no update, then a short soak (``bench.soak``: 16 clients, 15 s, 5 adapters with churn and
a training job) in which every request is answered as designed and nothing leaks.

The full soak (64 clients, 2 minutes, 20 adapters) is ``python -m bench.soak``; its last result is in
docs/reliability.md. The store's own multi-process tests are in tests/test_jobs_store.py.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from bench.soak.config import ServerSettings, SoakConfig
from bench.soak.run import Load
from testing.jobs import TRAIN_ROWS
from testing.server import Server, running_server

KEY = "load-" + "a7c3" * 6
SETTINGS = ServerSettings(num_api_servers=2)
QUICK = {"lora": {"r": 2, "lora_alpha": 4}, "training": {"num_train_epochs": 1, "eval_fraction": 0}}


@pytest.fixture(scope="module")
def srv(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("rel-load")
    with running_server(tiny_base, root / "adapters", root / "data", api_key=KEY, args=SETTINGS.args()) as s:
        yield s


def _train_requests_by_process(data_dir: Path) -> dict[int, float]:
    """POST /train requests each process counted, from its own multiprocess metrics file."""
    out: dict[int, float] = {}
    for path in (data_dir / "prometheus").glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for key, value, _ts, _pos in MmapedDict.read_all_values_from_file(str(path)):
            metric, name, labels, *_ = json.loads(key)
            if name == "loraserve_requests_total" and labels.get("endpoint") == "/train" and value:
                out[pid] = out.get(pid, 0) + value
    return out


def test_two_api_processes_write_the_job_store_without_losing_updates(srv: Server) -> None:
    data_dir = srv.log_path.parent
    with srv.client(timeout=60, limits=httpx.Limits(max_connections=64)) as c:

        def submit(args: tuple[str, str | None]) -> httpx.Response:
            adapter, key = args
            headers = {"Idempotency-Key": key} if key else {}
            return c.post(
                "/train", json={"adapter": adapter, "data": TRAIN_ROWS, "config": QUICK}, headers=headers
            )

        work = [(f"store-{i:02d}", None) for i in range(24)]
        work += [("same-key", "retry-7")] * 8  # one client retrying: one job
        work += [("contested", None)] * 6  # several clients, one adapter: one job, the rest 409
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(submit, work))

        by_adapter: dict[str, list[httpx.Response]] = {}
        for (adapter, _), r in zip(work, answers, strict=True):
            by_adapter.setdefault(adapter, []).append(r)
        for i in range(24):
            [r] = by_adapter[f"store-{i:02d}"]
            assert r.status_code == 202, r.text
        retried = by_adapter["same-key"]
        assert {r.status_code for r in retried} == {202} and len({r.json()["job_id"] for r in retried}) == 1
        contested = Counter(r.status_code for r in by_adapter["contested"])
        assert contested == {202: 1, 409: 5}, contested
        assert all(
            r.json()["error"]["code"] == "adapter_busy"
            for r in by_adapter["contested"]
            if r.status_code == 409
        )
        created = {r.json()["job_id"] for r in answers if r.status_code == 202}
        assert len(created) == 26

        # Cancel them all at once, through both processes, while the runner claims and starts one.
        with ThreadPoolExecutor(24) as pool:
            cancels = list(pool.map(lambda j: c.delete(f"/train/{j}"), sorted(created)))
        assert all(r.status_code == 200 and r.json()["status"] in ("cancelled", "running") for r in cancels)

        def settled() -> list[dict] | None:
            jobs = c.get("/train", params={"limit": 1000}).json()["jobs"]
            return jobs if all(j["status"] not in ("queued", "running") for j in jobs) else None

        deadline = time.monotonic() + 90
        while (jobs := settled()) is None:
            assert time.monotonic() < deadline, "jobs still queued or running 90 s after their cancel"
            time.sleep(0.5)
        listed = [j["job_id"] for j in jobs]
        assert sorted(listed) == sorted(created)  # every job once: none lost, none doubled
        assert {j["status"] for j in jobs} == {"cancelled"}, Counter(j["status"] for j in jobs)

    per_process = _train_requests_by_process(data_dir)
    assert len(per_process) >= 2, f"expected both API processes to serve /train: {per_process}"
    assert sum(per_process.values()) >= len(work)  # POSTs, plus the GET /train polls


def test_short_soak(srv: Server, tiny_base: Path) -> None:
    """The short form of ``python -m bench.soak``, chaos included: kill -9 of the generation worker
    early in the load and of the running trainer half-way."""
    config = SoakConfig(
        clients=16,
        duration=40.0,
        adapters=5,
        churn=2,
        train=True,
        seed=7,
        kill_worker_at=0.1,
        kill_trainer_at=0.5,
        warmup_fraction=0.5,
    )
    data_dir = srv.log_path.parent
    result = Load(srv.url, KEY, tiny_base, srv.proc.pid, config, SETTINGS, data_dir=data_dir).run()
    keys = ("generated", "refused_503_429", "tokens_per_s", "latency_s", "jobs", "chaos", "disconnects")
    summary = {k: result[k] for k in keys}
    print("short soak:", json.dumps(summary | {"memory": result["memory"]}))
    problems = {
        k: result[k]
        for k in ("violations", "leaks", "counters", "memory")
        if k == "violations" or not result[k]["ok"]
    }
    assert result["ok"], json.dumps(problems, indent=2)[:6000]
    assert result["generated"] >= 16 and result["uploads"] >= 5 and result["deletes"] >= 1
    assert result["leaks"]["burst_admitted"] == SETTINGS.max_in_flight
    assert result["leaks"]["adapter_pins"] == 0 and result["leaks"]["jobs_listed_once"]
    assert result["chaos"]["worker"]["serving_again_s"] < 60, result["chaos"]
    assert "trainer" in result["chaos"], result["chaos"]
    assert result["jobs"].get("failed") == 1, result["jobs"]  # the killed one, and only it
