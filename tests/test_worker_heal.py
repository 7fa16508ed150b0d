"""``kill -9`` of the real generation worker of a real server: it heals in place.

In-flight requests (a stream, a non-streamed /generate, a non-streamed /v1/completions) get a JSON
503 ``worker_restarted`` with Retry-After (an error event on the stream) within seconds; readiness is
503 while the new worker loads the model and 200 after; serving resumes with the same output (the
adapter reloaded on demand); a training job running meanwhile finishes once, untouched. A second
death past ``--worker-max-restarts 1`` stops the server with exit code 1 and every process gone.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from testing.jobs import TRAIN_ROWS
from testing.procs import group_members
from testing.server import running_server
from testing.weights import lora_files, upload_files

FAIL_WITHIN_S = 5.0  # in-flight requests answered this soon after the kill
HEAL_WITHIN_S = 60.0  # serving again this soon on this CPU (docs/reliability.md)


def _worker_pid(data: Path) -> int:
    return json.loads((data / "worker-status.json").read_text())["pid"]


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not {what} within {timeout:.0f} s")


def test_killed_worker_heals_in_place_then_repeated_deaths_stop_the_server(
    tiny_base: Path, tmp_path: Path
) -> None:
    adapters, data = tmp_path / "adapters", tmp_path / "data"
    args = ["--worker-max-restarts", "1", "--train-yield-rows", "0"]
    with running_server(tiny_base, adapters, data, args=args) as srv, srv.client() as c:
        assert c.put("/adapters/keep", files=upload_files(*lora_files(2, 64, seed=3))).status_code == 201
        probe = {"prompt": "Hello there", "adapter": "keep", "max_new_tokens": 8, "temperature": 0}
        before = c.post("/generate", json=probe)
        assert before.status_code == 200, before.text

        config = {"training": {"num_train_epochs": 40, "eval_fraction": 0, "max_seq_length": 32}}
        r = c.post("/train", json={"adapter": "trained", "data": TRAIN_ROWS, "config": config})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        _wait(lambda: c.get(f"/train/{job_id}").json()["status"] == "running", 120, "training")

        outcomes: dict[str, dict] = {}
        streaming = threading.Event()

        def stream() -> None:
            body = {"prompt": "Count:", "max_new_tokens": 240, "raw": True, "stream": True, "temperature": 0}
            lines = []
            with srv.client(timeout=60) as sc, sc.stream("POST", "/generate", json=body) as s:
                for line in s.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
                        streaming.set()
            outcomes["stream"] = {"status": s.status_code, "lines": lines, "at": time.monotonic()}

        def post(name: str, path: str, body: dict) -> None:
            with srv.client(timeout=60) as pc:
                r = pc.post(path, json=body)
            outcomes[name] = {"response": r, "at": time.monotonic()}

        threads = [
            threading.Thread(target=stream),
            threading.Thread(
                target=post,
                args=("generate", "/generate", {"prompt": "Once", "max_new_tokens": 240, "temperature": 0}),
            ),
            threading.Thread(
                target=post,
                args=("completions", "/v1/completions", {"model": "base", "prompt": "A", "max_tokens": 240}),
            ),
        ]
        for t in threads:
            t.start()
        assert streaming.wait(60)
        time.sleep(0.3)  # the two others are queued or running by now
        pid = _worker_pid(data)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)

        not_ready = []

        def ready() -> bool:
            r = c.get("/health/ready")
            if r.status_code != 200:
                not_ready.append(r.json())
            return r.status_code == 200 and _worker_pid(data) != pid

        _wait(ready, HEAL_WITHIN_S, "ready again")
        healed = time.monotonic() - killed
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a request hung after the worker died"

        # every in-flight request: the 503 envelope (an error event on the stream), within seconds
        for name in ("generate", "completions"):
            r = outcomes[name]["response"]
            assert r.status_code == 503, (name, r.status_code, r.text)
            assert r.json()["error"]["code"] == "worker_restarted"
            assert r.headers["Retry-After"].isdigit()
            assert outcomes[name]["at"] - killed < FAIL_WITHIN_S, name
        s = outcomes["stream"]
        assert s["status"] == 200 and s["lines"][-1] != "[DONE]"
        assert json.loads(s["lines"][-1])["error"]["code"] == "worker_restarted"
        assert s["at"] - killed < FAIL_WITHIN_S
        # readiness said so meanwhile
        assert not_ready and not_ready[0]["status"] in ("starting", "failed")
        assert any("died" in (x.get("detail") or "") for x in not_ready)

        # serving resumed, with the same output: the model reloaded, the adapter reloaded on demand
        after = c.post("/generate", json=probe)
        assert after.status_code == 200, after.text
        assert after.json()["text"] == before.json()["text"]
        metrics = c.get("/metrics").text
        assert "loraserve_worker_restarts_total 1.0" in metrics
        assert "loraserve_num_requests_running 0.0" in metrics  # the dead worker's gauges are gone

        # the training job ran on, once
        job = _wait(
            lambda: (j := c.get(f"/train/{job_id}").json())["status"] in ("succeeded", "failed") and j,
            240,
            "the job finished",
        )
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        assert c.post("/generate", json=dict(probe, adapter="trained")).status_code == 200

        # a second death is one more than --worker-max-restarts 1 allows: exit code 1, nothing left
        os.kill(_worker_pid(data), signal.SIGKILL)
        assert srv.proc.wait(45) == 1
        _wait(lambda: not group_members(srv.proc.pid), 20, "every server process gone")
        text = srv.log_path.read_text(errors="replace")
        assert "restarting it (restart 1 of at most 1" in text and "kept dying" in text
    print(f"worker killed: serving again {healed:.1f} s after the kill")
