"""Injected faults against the real server: a full disk under the adapter directory while an upload
and a training job publish.

The disk is a real 256 KiB tmpfs mounted over the adapter directory in a private mount namespace of
the server (``unshare --user --map-root-user --mount``): nothing is mounted on the host, nothing needs
cleaning up, and the writes fail with the kernel's own ENOSPC. The test reads the server's view of
the folder through ``/proc/<pid>/root``.

Covered elsewhere (docs/reliability.md): kill -9 of the generation worker (tests/test_worker_heal.py),
of the trainer and of the whole server mid-job (tests/test_jobs_http.py), server-side deadlines
answering 504 (tests/test_service_lifecycle.py).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from bench.adapters import lora_files, upload_files
from bench.soak import TRAIN_ROWS
from tests.helpers.server import running_server

KEY = "faults-" + "5eb1" * 6
TMPFS = "256k"


def _unshare_works() -> str | None:
    try:
        done = subprocess.run(
            ["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && echo ok"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if done.stdout.strip() == "ok" else (done.stderr.strip() or f"exit {done.returncode}")


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not {what} within {timeout:.0f} s")


def test_full_disk_keeps_the_old_version(tiny_base: Path, tmp_path: Path) -> None:
    problem = _unshare_works()
    if problem:
        pytest.skip(f"cannot mount a private tmpfs here (unshare -Urm): {problem}")
    adapters, data = tmp_path / "adapters", tmp_path / "data"
    prefix = [
        "unshare",
        "-Urm",
        "sh",
        "-c",
        f'mount -t tmpfs -o size={TMPFS} tmpfs "$0" && exec "$@"',
        str(adapters),
    ]
    with running_server(tiny_base, adapters, data, api_key=KEY, prefix=prefix) as srv, srv.client() as c:
        inside = Path(f"/proc/{srv.proc.pid}/root") / str(adapters).lstrip("/")  # the server's view
        body = {"prompt": "Hello there", "adapter": "keep", "max_new_tokens": 8, "temperature": 0}

        small = lora_files(2, 64, r=4, seed=1, scale=0.5)
        r = c.put("/adapters/keep", files=upload_files(*small))
        assert r.status_code == 201, r.text
        sha, served = r.json()["sha256"], c.post("/generate", json=body).json()["text"]
        assert (inside / "keep" / "adapter_model.safetensors").is_file()
        assert not any(adapters.iterdir()), "the tmpfs must be private to the server"

        # 1. An upload larger than the free space: 507, the old version intact and serving.
        big = lora_files(2, 64, r=128, seed=2)
        assert len(big[1]) > 256 * 1024
        r = c.put("/adapters/keep", files=upload_files(*big))
        assert r.status_code == 507, r.text
        err = r.json()["error"]
        assert err["code"] == "insufficient_storage" and "no space left" in err["message"]
        assert c.get("/adapters/keep").json()["sha256"] == sha
        assert c.post("/generate", json=body).json()["text"] == served
        assert [p.name for p in (inside / ".staging").iterdir()] == []  # nothing half-written left

        # 2. A training job whose adapter does not fit: failed with the reason, the old version serving.
        config = {
            "lora": {"r": 128, "lora_alpha": 256, "lora_dropout": 0.0},
            "training": {"num_train_epochs": 1, "eval_fraction": 0, "save_steps": 0, "max_seq_length": 32},
        }
        r = c.post(
            "/train", json={"adapter": "keep", "overwrite": True, "data": TRAIN_ROWS[:4], "config": config}
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]

        def finished():
            job = c.get(f"/train/{job_id}").json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        job = _wait(finished, 240, "finished")
        assert job["status"] == "failed", job
        assert "No space left on device" in job["error"] or "no space" in job["error"].lower(), job["error"]
        assert c.get("/adapters/keep").json()["sha256"] == sha
        assert c.post("/generate", json=body).json()["text"] == served
        log = c.get(f"/train/{job_id}/logs").text
        assert "No space left" in log and KEY not in log
