"""Scale-out roles against real servers: a ``serve`` replica and a ``runner`` sharing one adapter folder
and one job store (``--jobs-db``), each with its own data dir.

The ``serve`` replica queues a training job it will never run itself; the ``runner`` (no model, no
LitServe) trains it; the ``serve`` replica then reports the job finished and serves the new adapter.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from service.adapters.watcher import PROCESS_NAME
from testing.jobs import wait_job
from testing.procs import cmdline, comm, group_members
from testing.server import Server, running_server

KEY = "roles-key-0123456789"
ROWS = [
    {"prompt": prompt, "response": "Two roles share one job store."}
    for prompt in ("Hi", "Who are you?", "What now?", "Say something.")
]
QUICK = {
    "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
    "training": {"num_train_epochs": 1, "eval_fraction": 0, "save_steps": 0, "max_seq_length": 64},
}


def _tree(srv: Server) -> dict[int, str]:
    """Command lines of the server's live processes, by pid, but the adapter watcher's (a spawned child
    in every role, named by its ``comm``)."""
    members = [pid for pid, _ in group_members(srv.proc.pid) if comm(pid) != PROCESS_NAME]
    return {pid: line for pid in members if (line := cmdline(pid))}


def test_serve_queues_jobs_a_runner_trains_them_and_serve_serves_the_adapter(tiny_base: Path, tmp_path: Path):
    adapters, shared = tmp_path / "adapters", tmp_path / "shared"
    common = ["--jobs-db", str(shared / "jobs.sqlite3")]
    serve_args = [*common, "--role", "serve"]
    with (
        running_server(tiny_base, adapters, tmp_path / "serve-data", api_key=KEY, args=serve_args) as serve,
        serve.client() as sc,
    ):
        ready = sc.get("/health/ready").json()
        assert ready["status"] == "ready" and ready["role"] == "serve"
        r = sc.post("/train", json={"adapter": "shared", "data": ROWS, "config": QUICK})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert (shared / "jobs" / job_id / "data.jsonl").is_file()  # beside the shared store
        assert not (tmp_path / "serve-data" / "jobs").exists()
        # A job runner in this server would claim the job within a quarter of a second.
        time.sleep(2.0)
        job = sc.get(f"/train/{job_id}").json()
        assert job["status"] == "queued" and job["attempts"] == 0 and job["started_at"] is None
        serve_tree = _tree(serve).values()
        assert sum("spawn_main" in c for c in serve_tree) == 1, serve_tree  # the generation worker only

        runner_args = [*common, "--role", "runner"]
        with (
            running_server(
                tiny_base, adapters, tmp_path / "runner-data", api_key=KEY, args=runner_args
            ) as runner,
            runner.client() as rc,
        ):
            r = rc.get("/health/ready")
            assert r.status_code == 200 and r.json()["role"] == "runner", r.text
            assert "no generation model" in r.json()["detail"]
            gen = {"prompt": "Hi", "max_new_tokens": 4}
            for method, path, body in (
                ("POST", "/generate", gen),
                ("POST", "/v1/completions", {"model": "shared", "prompt": "Hi"}),
                ("POST", "/v1/chat/completions", {"model": "x", "messages": []}),
                ("GET", "/v1/models", None),
            ):
                r = rc.request(method, path, json=body)
                assert r.status_code == 503, (path, r.text)
                error = r.json()["error"]
                assert error["code"] == "generation_not_served" and "'runner'" in error["message"], error
                assert "Retry-After" not in r.headers  # retrying this server will not help
            assert httpx.post(f"{runner.url}/generate", json=gen).status_code == 401  # still needs the key
            assert httpx.get(f"{runner.url}/ui/").status_code == 200  # the web console, open as on serve
            # No LitServe (no forked API servers, no generation worker): main + the job runner.
            runner_tree = _tree(runner)
            main = runner_tree[runner.proc.pid]
            assert [c for c in runner_tree.values() if c == main] == [main], runner_tree
            assert sum("spawn_main" in c for c in runner_tree.values()) == 1, runner_tree

            job = wait_job(sc, job_id, timeout=180)  # the serve replica watches the shared store
            assert job["status"] == "succeeded", job
            assert rc.get(f"/train/{job_id}").json()["status"] == "succeeded"
            assert rc.get("/adapters/shared").status_code == 200

        assert runner.proc.returncode == 0 and runner.stop_seconds is not None and runner.stop_seconds < 10
        # The runner is gone; the serve replica serves what it published and shows its log.
        r = sc.post(
            "/generate", json={"prompt": "Hi", "adapter": "shared", "max_new_tokens": 6, "temperature": 0}
        )
        assert r.status_code == 200 and r.json()["adapter"] == "shared", r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        assert "trainer" in sc.get(f"/train/{job_id}/logs").text
        r = sc.post("/train", json={"adapter": "shared", "data": ROWS})
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_exists"


def test_runner_role_stops_with_exit_code_1_when_its_job_runner_dies(tiny_base: Path, tmp_path: Path):
    """A dead job runner is not restarted in place (a dead generation worker is): a supervisor sees the
    failure and restarts the server."""
    args = ["--role", "runner"]
    with running_server(tiny_base, tmp_path / "a", tmp_path / "d", args=args) as runner:
        (child,) = [pid for pid, cmd in _tree(runner).items() if "spawn_main" in cmd]
        os.kill(child, signal.SIGKILL)
        runner.proc.wait(timeout=15)
    assert runner.proc.returncode == 1
    assert "the job runner died" in runner.log_path.read_text()
