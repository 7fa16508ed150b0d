"""The job runner with real trainer processes on the tiny base (no HTTP server): publish, cancel, a
killed trainer, a clean stop that resumes from the checkpoint, and the training metrics."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from loracore.artifact import file_sha256
from service.jobs.actions import TrainRequest, submit_job
from service.jobs.files import job_paths
from service.jobs.model import Job
from service.jobs.sql import JobStore
from service.settings import Settings
from testing.procs import alive

pytestmark = pytest.mark.slow
CTX = mp.get_context("spawn")  # as the server starts it
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


@pytest.fixture
def settings(tmp_path: Path, tiny_base: Path) -> Settings:
    return Settings(
        model=str(tiny_base), adapter_dir=tmp_path / "adapters", data_dir=tmp_path / "data", device="cpu"
    )


def submit(store: JobStore, settings: Settings, adapter: str, config: dict) -> Job:
    job, created = submit_job(store, settings, TrainRequest(adapter=adapter, data=ROWS, config=config))
    assert created
    return job


def wait_for(store: JobStore, job_id: str, pred: Callable[[Job], bool], timeout: float, what: str) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if pred(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not {what} within {timeout} s: {store.get(job_id)}")


@contextmanager
def runner(settings: Settings) -> Iterator[tuple[mp.process.BaseProcess, object]]:
    from service.jobs.runner import run_runner

    stop = CTX.Event()
    proc = CTX.Process(target=run_runner, args=(settings, stop), name="job-runner")
    proc.start()
    try:
        yield proc, stop
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise AssertionError("the runner did not stop within 30 s of stop_event")


def metric_values(prom_dir: Path) -> dict[str, float]:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(prom_dir))
    out = {}
    for family in registry.collect():
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_publish_then_clean_stop_resumes(settings: Settings, tmp_path: Path, monkeypatch) -> None:
    prom = tmp_path / "prometheus"
    prom.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(prom))  # the spawned runners export here
    store = JobStore(settings.jobs_db)
    first = submit(store, settings, "first", quick(2))  # 24 rows / batch 8 x 2 epochs = 6 steps
    resumed = submit(store, settings, "resumed", quick(4, save_steps=2))  # 12 steps, a checkpoint every 2
    never = submit(store, settings, "never", quick(1))
    assert store.request_cancel(never.id).status == "cancelled"  # queued -> cancelled at once

    with runner(settings) as (proc, _):
        done = wait_for(store, first.id, lambda j: j.finished, 180, "finished")
        assert done.status == "succeeded", done.error
        adapter = settings.adapter_dir / "first"
        meta = json.loads((adapter / "loraserve.json").read_text())
        assert meta["job"] == first.id
        assert meta["sha256"] == file_sha256(adapter / "adapter_model.safetensors")
        assert done.progress["step"] == done.progress["total_steps"] == 6
        assert not (settings.staging_dir / first.id).exists()
        assert "--job-id" in job_paths(settings, first.id).log.read_text()
        # a clean stop of the runner (server shutdown) while the next job trains ...
        at = wait_for(store, resumed.id, lambda j: j.progress.get("step", 0) >= 3, 120, "past a checkpoint")
        pid = at.trainer_pid
        assert pid and alive(pid)
    assert not alive(pid)
    back = store.get(resumed.id)
    assert back.status == "queued" and back.resume and back.attempts == 0, back  # ... requeues it
    paths = job_paths(settings, resumed.id)
    assert "SIGTERM" in paths.log.read_text()  # the trainer stopped at a step and wrote a checkpoint
    assert any(p.name.startswith("checkpoint-") for p in paths.checkpoints.iterdir())
    stopped_at = back.progress["step"]

    # A runner that died after its trainer had finished but before publishing: the next runner
    # publishes the finished output (here replacing "first", as the job asked) instead of retraining.
    orphan, _ = submit_job(store, settings, TrainRequest(adapter="first", data=ROWS, overwrite=True))
    gone = "some-host|1|1|gone"
    assert store.claim_next(gone, 0.01, max_running=5).id == resumed.id  # the oldest first
    assert store.claim_next(gone, 0.01, max_running=5).id == orphan.id
    assert store.release(resumed.id, gone)  # only the orphan stays "running", its lease expiring
    shutil.copytree(settings.adapter_dir / "first", settings.staging_dir / orphan.id)

    with runner(settings):  # ... and the next start resumes it from its checkpoint
        done = wait_for(store, resumed.id, lambda j: j.finished, 180, "finished")
        published = wait_for(store, orphan.id, lambda j: j.finished, 30, "published")
    assert published.status == "succeeded", published.error
    # published: the staged output is gone, renamed in as "first"'s current version (the same bytes as
    # the version already stored, so that stored version, record included, is the one served)
    assert not (settings.staging_dir / orphan.id).exists()
    record = json.loads((settings.adapter_dir / "first" / "loraserve.json").read_text())
    assert record["sha256"] == file_sha256(settings.adapter_dir / "first" / "adapter_model.safetensors")
    assert not job_paths(settings, orphan.id).log.exists()  # no trainer ran for it
    assert done.status == "succeeded", done.error
    assert done.attempts == 1 and done.progress["step"] == 12
    assert not paths.checkpoints.exists()  # a finished job's checkpoints are removed
    events = [json.loads(line) for line in paths.progress.read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"] and 2 <= starts[1]["step"] <= stopped_at
    assert json.loads((settings.adapter_dir / "resumed" / "loraserve.json").read_text())["job"] == resumed.id
    assert (
        store.get(never.id).status == "cancelled"
        and not paths.root.with_name(never.id).joinpath("progress.jsonl").exists()
    )  # it never started

    values = metric_values(prom)
    assert values["loraserve_train_jobs_finished_total{status=succeeded}"] == 3
    assert values["loraserve_train_steps_total"] >= 6 + 12
    assert values["loraserve_train_loss"] > 0
    assert values["loraserve_train_tokens_per_second"] > 0
    assert values["loraserve_train_job_duration_seconds_count"] == 3
    assert values["loraserve_train_jobs{status=succeeded}"] == 3
