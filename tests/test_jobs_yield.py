"""Serving first on a shared device, against the real server on loopback: while /generate traffic keeps
the generation worker busy, the running job yields between optimizer steps (the worker publishes its
load, the runner raises the job's yield file, the trainer waits on it), yet is not starved: at the
default minimum training share (0.5) it pauses at most as long as it works, however long the traffic
lasts; the job, the metrics and the trainer's command line show it. The loss equality of paused and
unpaused runs is
``tests/test_trainer.py::test_yielding_pauses_between_steps_and_leaves_the_loss_curve_unchanged``."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from testing.server import running_server

pytestmark = pytest.mark.slow
ROWS = [
    json.loads(line) for line in (Path(__file__).parent.parent / "examples" / "fixed_sentence.jsonl").open()
]
QUICK = {  # 24 rows / batch 8 x 2 epochs = 6 steps
    "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
    "training": {"num_train_epochs": 2, "eval_fraction": 0, "save_steps": 0, "max_seq_length": 64},
}


def at(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_job_yields_to_live_traffic_without_being_starved(tiny_base: Path, tmp_path: Path) -> None:
    # A long pause bound: the bound alone (share 0) would pause each of the 7 waits (the model load and
    # 6 steps) 5 s, far longer than the tiny job works; the share keeps the pauses within its work.
    env = {"LORASERVE_TRAIN_MAX_PAUSE": "5.0", "LORASERVE_TRAIN_THREADS": "1"}
    data_dir = tmp_path / "data"
    # --device auto, as `make run` starts it: the CPU thread split must follow the device it resolves to
    device = ["--device", "auto"]
    with (
        running_server(tiny_base, tmp_path / "adapters", data_dir, env=env, args=device) as srv,
        srv.client() as client,
    ):
        stop = threading.Event()
        answered: list[int] = []

        def traffic() -> None:  # closed-loop clients: a request always waits or runs
            with srv.client() as c:
                while not stop.is_set():
                    r = c.post("/generate", json={"prompt": "Hello there", "max_new_tokens": 48})
                    answered.append(r.status_code)

        clients = [threading.Thread(target=traffic, daemon=True) for _ in range(3)]
        for t in clients:
            t.start()
        try:
            deadline = time.monotonic() + 30  # the worker publishes its load while busy
            status: dict = {}
            while time.monotonic() < deadline:
                status = json.loads((data_dir / "worker-status.json").read_text())
                if status.get("load", {}).get("running"):
                    break
                time.sleep(0.1)
            load = status["load"]
            assert load["running"] >= 1 and time.time() - load["time"] < 5, status
            full_threads = status["threads"]  # no trainer yet: torch's default, every core

            r = client.post("/train", json={"adapter": "yielding", "data": ROWS, "config": QUICK})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            flag = data_dir / "jobs" / job_id / "yield"
            saw_flag, job, threads_seen = False, {}, set()
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                saw_flag = saw_flag or flag.exists()
                with contextlib.suppress(OSError, ValueError):
                    threads_seen.add(json.loads((data_dir / "worker-status.json").read_text())["threads"])
                job = client.get(f"/train/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.1)
        finally:
            stop.set()
            for t in clients:
                t.join(60)
        assert job["status"] == "succeeded", job
        assert saw_flag and not flag.exists()  # raised while serving was busy; gone once the job ended
        assert answered and set(answered) == {200}
        # It yielded: the model load alone (the tiny base: well over a second with torch's import on a
        # busy machine) earns a pause as long as itself, and the traffic never stopped.
        yielded = job["progress"]["yielded_seconds"]
        assert job["progress"]["step"] == 6 and yielded >= 0.5, job
        # Not starved: the trainer paused at most as long as it worked (share 0.5), so at most half the
        # job's run (started -> finished also holds the process start and the runner's polls: more work).
        ran = (at(job["finished_at"]) - at(job["started_at"])).total_seconds()
        assert yielded <= ran / 2 + 0.5, (yielded, ran)
        cmdline = (data_dir / "jobs" / job_id / "train.log").read_text()
        assert f"--yield-file {flag}" in cmdline and "--max-pause-seconds 5.0" in cmdline
        assert "--min-train-share 0.5" in cmdline  # the default
        # the metric counts exactly what the trainer reported
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "loraserve_train_yield_seconds_total") == pytest.approx(yielded, abs=0.01)
        # serving idle again: the worker said so at once, and the runner lowered the flag
        status = json.loads((data_dir / "worker-status.json").read_text())
        assert status["load"]["running"] == status["load"]["waiting"] == 0
        # while the trainer (one thread) ran, generation kept the other cores; all of them once it ended
        beside = max(1, min(full_threads, (os.cpu_count() or 1) - 1))
        assert min(threads_seen) == beside, (threads_seen, full_threads)
        deadline = time.monotonic() + 10  # the runner's next pass, then the worker's next read
        while status["threads"] != full_threads and time.monotonic() < deadline:
            time.sleep(0.1)
            status = json.loads((data_dir / "worker-status.json").read_text())
        assert status["threads"] == full_threads
        assert not (data_dir / "generation-threads").exists()
