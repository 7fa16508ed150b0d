"""Scale-out on a real PostgreSQL job store: two job runners "on two hosts" and one serving replica.

Every process is a real ``python -m service`` on loopback. The runners each run in their own UTS
namespace (``unshare --user --map-root-user --uts``) with their own hostname, so each sees the
other's lease owner as a foreign host and can only take its jobs over once the lease expires, as on
separate machines. They share what separate hosts would share: the database, the adapter folder and
the job folder (``--jobs-dir``, a ReadWriteMany volume in Kubernetes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from service.jobs.runner import LEASE_SECONDS
from service.jobs.sql import JobStore
from testing.jobs import wait_job
from testing.server import Server, running_server

pytestmark = pytest.mark.slow
KEY = "pg-key-0123456789abcdef"
ROWS = [
    json.loads(line) for line in (Path(__file__).parent.parent / "examples" / "fixed_sentence.jsonl").open()
]


def quick(epochs: int, save_steps: int = 0) -> dict:
    return {
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "training": {
            "num_train_epochs": epochs,
            "eval_fraction": 0,
            "save_steps": save_steps,
            "max_seq_length": 64,
        },
    }


def on_host(name: str) -> list[str]:
    """A command prefix that runs the server with ``name`` as its hostname."""
    probe = subprocess.run(["unshare", "-Uru", "hostname", name], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"unshare -Uru cannot give a process its own hostname here: {probe.stderr.strip()}")
    return ["unshare", "-Uru", "sh", "-c", 'hostname "$0" && exec "$@"', name]


def starts(shared: Path, job_id: str) -> list[dict]:
    path = shared / "jobs" / job_id / "progress.jsonl"
    return [e for e in map(json.loads, path.read_text().splitlines()) if e.get("event") == "start"]


def test_two_runners_share_a_postgres_store_and_take_over_a_killed_runners_job(
    postgres, tiny_base: Path, tmp_path: Path
) -> None:
    url = postgres.new_database()
    adapters, shared = tmp_path / "adapters", tmp_path / "shared"
    env = {"LORASERVE_JOBS_DB": url}  # the password stays off the command lines
    common = ["--jobs-dir", str(shared)]
    with ExitStack() as stack:
        serve = stack.enter_context(
            running_server(
                tiny_base,
                adapters,
                tmp_path / "serve",
                api_key=KEY,
                env=env,
                args=[*common, "--role", "serve"],
            )
        )
        runners: dict[str, Server] = {
            host: stack.enter_context(
                running_server(
                    tiny_base,
                    adapters,
                    tmp_path / host,
                    api_key=KEY,
                    env=env,
                    # the limit counts across runners: two jobs at once, one on each
                    args=[
                        *common,
                        "--role",
                        "runner",
                        "--max-concurrent-jobs",
                        "2",
                        "--jobs-per-runner",
                        "1",
                    ],
                    prefix=on_host(host),
                )
            )
            for host in ("host-a", "host-b")
        }
        assert postgres.password not in serve.log_path.read_text()  # the URL is logged without it
        client = stack.enter_context(serve.client())

        # N jobs, queued through the serving replica: each runs exactly once, on one of the runners.
        ids = []
        for i in range(4):
            r = client.post("/train", json={"adapter": f"a{i}", "data": ROWS, "config": quick(1)})
            assert r.status_code == 202, r.text
            ids.append(r.json()["job_id"])
        for i, job_id in enumerate(ids):
            job = wait_job(
                client,
                job_id,
                lambda j: j["status"] in ("succeeded", "failed"),
                240,
                "finished",
                strict=False,
            )
            assert job["status"] == "succeeded" and job["attempts"] == 1, job
            # ... and the serving replica serves the adapter at once (shared adapter folder).
            r = client.post("/generate", json={"prompt": "Hi", "adapter": f"a{i}", "max_new_tokens": 3})
            assert r.status_code == 200 and r.json()["adapter"] == f"a{i}", r.text
        logs = {host: srv.log_path.read_text() for host, srv in runners.items()}
        for job_id in ids:
            assert sum(log.count(f"job {job_id}: succeeded") for log in logs.values()) == 1
            assert len(starts(shared, job_id)) == 1  # one trainer ever started for it
        assert all(any(f"job {j}: succeeded" in log for j in ids) for log in logs.values()), "one runner idle"

        # kill -9 of the runner (and its trainer: the whole host) holding a job past its first checkpoint.
        r = client.post("/train", json={"adapter": "long", "data": ROWS, "config": quick(16, save_steps=2)})
        long_id = r.json()["job_id"]
        store = JobStore(url)
        deadline = time.monotonic() + 120
        while (job := store.get(long_id)).progress.get("step", 0) < 4 or not job.trainer_pid:
            assert job.status in ("queued", "running") and time.monotonic() < deadline, job
            time.sleep(0.1)
        holder = job.lease_owner.split("|")[0]
        other = next(h for h in runners if h != holder)
        os.killpg(runners[holder].proc.pid, signal.SIGKILL)
        os.killpg(job.trainer_pid, signal.SIGKILL)
        killed = time.monotonic()
        while (now := store.get(long_id)).lease_owner == job.lease_owner:
            assert time.monotonic() - killed < LEASE_SECONDS + 30, now
            time.sleep(0.2)
        taken_after = time.monotonic() - killed
        assert taken_after >= LEASE_SECONDS - 2, taken_after  # not before the lease ran out
        done = wait_job(
            client, long_id, lambda j: j["status"] in ("succeeded", "failed"), 240, "finished", strict=False
        )
        assert done["status"] == "succeeded" and done["attempts"] == 2, done
        first, second = starts(shared, long_id)
        assert first["resumed_from"] is None and second["resumed_from"], second  # from its checkpoint
        assert second["step"] >= 2
        assert f"job {long_id}: succeeded" in runners[other].log_path.read_text()
        r = client.post("/generate", json={"prompt": "Hi", "adapter": "long", "max_new_tokens": 3})
        assert r.status_code == 200, r.text


def test_database_going_away_mid_job_loses_nothing(postgres, tiny_base: Path, tmp_path: Path) -> None:
    url = postgres.new_database()
    args = ["--role", "runner", "--jobs-dir", str(tmp_path / "shared")]
    env = {"LORASERVE_JOBS_DB": url}
    with (
        running_server(
            tiny_base, tmp_path / "adapters", tmp_path / "d", api_key=KEY, env=env, args=args
        ) as srv,
        srv.client() as client,
    ):
        r = client.post("/train", json={"adapter": "steady", "data": ROWS, "config": quick(16, save_steps=2)})
        job_id = r.json()["job_id"]
        wait_job(
            client,
            job_id,
            lambda j: (j.get("progress") or {}).get("step", 0) >= 2,
            120,
            "training",
            strict=False,
        )
        postgres.stop("immediate")
        try:
            time.sleep(3)
            r = client.get(f"/train/{job_id}")
            assert r.status_code == 503 and r.json()["error"]["code"] == "job_store_unavailable", r.text
            assert "Retry-After" in r.headers
            r = client.post("/train", json={"adapter": "later", "data": ROWS})
            assert r.status_code == 503, r.text
            log = srv.log_path.read_text()
            assert log.count("job store postgresql://loraserve:***@") >= 1 and "unreachable" in log
            assert postgres.password not in log
            # the runner meets the outage at its next store write (a progress line, the final state):
            # wait for its own line, so that its recovery below is exercised every time
            deadline = time.monotonic() + 90
            while "job runner: job store" not in srv.log_path.read_text():
                assert time.monotonic() < deadline, "the job runner never met the outage"
                time.sleep(0.2)
        finally:
            postgres.start()
        job = wait_job(
            client, job_id, lambda j: j["status"] in ("succeeded", "failed"), 240, "finished", strict=False
        )
        assert job["status"] == "succeeded" and job["attempts"] == 1, job  # the outage cost no attempt
        assert "reachable again" in srv.log_path.read_text()
        assert client.get("/adapters/steady").status_code == 200
