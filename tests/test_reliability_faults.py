"""Injected faults against the real server: the adapter disk full.

The adapter directory is a real tmpfs the test mounts (as root; unmounted in teardown), and the test
fills it with a file of its own until the kernel answers ENOSPC. With the disk full: every adapter
and version published before serves ``200`` with the text it served before (also one never
requested before, and one placed by hand), an upload is ``507`` naming the problem, a training job
whose publish does not fit ends ``failed`` naming the reason while the previous version keeps
serving, and nothing half-written is visible (no staging leftovers, every stored version whole).
Once the filler is removed, uploads and training jobs work again without a restart.

Covered elsewhere (docs/reliability.md): kill -9 of the generation worker (tests/test_worker_heal.py),
of the trainer and of the whole server mid-job (tests/test_jobs_http.py), server-side deadlines
answering 504 (tests/test_service_lifecycle.py).
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loracore import artifact
from testing.jobs import TRAIN_ROWS, wait_job
from testing.server import running_server
from testing.weights import lora_files, upload_files

KEY = "faults-" + "5eb1" * 6
TMPFS = "4m"
FILLER = ".filler"  # hidden: not an adapter name
QUICK = {
    "lora": {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0},
    "training": {"num_train_epochs": 1, "eval_fraction": 0, "save_steps": 0, "max_seq_length": 32},
}
BIG = {**QUICK, "lora": {"r": 256, "lora_alpha": 512, "lora_dropout": 0.0}}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of ``TMPFS`` mounted on a folder of this test's own, unmounted afterwards."""
    where = tmp_path / "adapters"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the test runs as root in make test): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=False)


def fill(disk: Path) -> int:
    """Write ``disk/FILLER`` until the filesystem is full; returns its size."""
    block = b"\0" * 4096
    size = 0
    with open(disk / FILLER, "wb", buffering=0) as fh:
        try:
            while True:
                size += fh.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return size


def nothing_half_written(disk: Path) -> None:
    """No staging leftovers; every stored version is whole (its weights hash to its id)."""
    assert [p.name for p in (disk / artifact.STAGING).iterdir()] == []
    for folder in (disk / artifact.VERSIONS).glob("*/*"):
        assert artifact.file_sha256(folder / artifact.WEIGHTS_FILE) == folder.name, folder


def test_a_full_adapter_disk_breaks_nothing_published(tiny_base: Path, tmp_path: Path, small_disk: Path):
    disk = small_disk
    with running_server(tiny_base, disk, tmp_path / "data", api_key=KEY) as srv, srv.client() as c:

        def text(adapter: str) -> str:
            body = {"prompt": "Hello there", "adapter": adapter, "max_new_tokens": 8, "temperature": 0}
            r = c.post("/generate", json=body)
            assert r.status_code == 200, (adapter, r.status_code, r.text)
            return r.json()["text"]

        def put(name: str, files: tuple[bytes, bytes]) -> httpx.Response:
            return c.put(f"/adapters/{name}", files=upload_files(*files))

        v1 = put("keep", lora_files(2, 64, r=4, seed=1, scale=0.5)).json()["sha256"]
        before = {"keep@" + v1[:8]: text("keep")}
        v2 = put("keep", lora_files(2, 64, r=4, seed=2, scale=0.5)).json()["sha256"]
        before["keep"] = text("keep")
        assert put("fresh", lora_files(2, 64, r=4, seed=3, scale=0.5)).status_code == 201  # never requested
        hand = disk / "hand"  # placed by hand
        hand.mkdir()
        config, weights = lora_files(2, 64, r=4, seed=4, scale=0.5)
        (hand / artifact.CONFIG_FILE).write_bytes(config)
        (hand / artifact.WEIGHTS_FILE).write_bytes(weights)
        assert fill(disk) > 0

        # 1. Everything published serves as before; nothing is written to serve it.
        for ref, served in before.items():
            assert text(ref) == served
        fresh, by_hand = text("fresh"), text("hand")
        assert text(f"keep@{v2[:8]}") == before["keep"]
        versions = [v["id"] for v in c.get("/adapters/keep").json()["versions"]]
        assert versions == [v2, v1]
        r = c.post(
            "/v1/completions", json={"model": f"keep@{v1[:8]}", "prompt": "Hello there", "max_tokens": 4}
        )
        assert r.status_code == 200, r.text

        # 2. An upload (new or replacing) is 507 naming the problem; the old version is untouched.
        for name in ("new", "keep"):
            r = put(name, lora_files(2, 64, r=8, seed=5))
            assert r.status_code == 507, r.text
            err = r.json()["error"]
            assert err["code"] == "insufficient_storage" and "no space left" in err["message"], err
            assert name in err["message"]
        assert c.get("/adapters/keep").json()["sha256"] == v2
        assert c.get("/adapters/new").status_code == 404
        nothing_half_written(disk)

        # 3. A training job that replaces it fails naming the reason; the previous version serves.
        r = c.post(
            "/train", json={"adapter": "keep", "overwrite": True, "data": TRAIN_ROWS[:4], "config": BIG}
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        finished = wait_job(c, job_id)
        assert finished["status"] == "failed", finished
        assert "no space left on device" in finished["error"].lower(), finished["error"]
        assert c.get("/adapters/keep").json()["sha256"] == v2
        assert text("keep") == before["keep"] and text(f"keep@{v1[:8]}") == before["keep@" + v1[:8]]
        log = c.get(f"/train/{job_id}/logs").text
        assert "No space left" in log and KEY not in log
        nothing_half_written(disk)
        metrics = c.get("/metrics").text
        assert not [m for m in metrics.splitlines() if 'status="5' in m and 'status="507"' not in m], metrics

        # 4. Space returns: uploads and jobs work again, without a restart.
        os.unlink(disk / FILLER)
        r = put("new", lora_files(2, 64, r=8, seed=5))
        assert r.status_code == 201, r.text
        text("new")
        r = c.post(
            "/train", json={"adapter": "keep", "overwrite": True, "data": TRAIN_ROWS[:4], "config": QUICK}
        )
        assert r.status_code == 202, r.text
        finished = wait_job(c, r.json()["job_id"])
        assert finished["status"] == "succeeded", finished
        info = c.get("/adapters/keep").json()
        assert [v["id"] for v in info["versions"]][1:] == [v2, v1]
        assert text(f"keep@{v2[:8]}") == before["keep"]
        assert text("fresh") == fresh and text("hand") == by_hand
        nothing_half_written(disk)
