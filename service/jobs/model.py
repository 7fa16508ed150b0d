"""The jobs domain: a training job and a dataset, the statuses and the moves between them, and the
errors of the domain. No HTTP here: ``service.errors`` maps the error codes to statuses.

    queued ──claim──► running ──trainer exits 0, published──► succeeded
      │                 │  └────trainer failed / gave up───────► failed
      │                 └─cancel (the runner stops the trainer)► cancelled
      └──────cancel──────────────────────────────────────────► cancelled
    running ──runner gone or clean shutdown──► queued (resumes from its last checkpoint)
    queued ──pause──► paused ◄──pause (the runner stops the trainer: checkpoint, exit)── running
    paused ──resume──► queued (the next claim resumes from the checkpoint)    paused ──cancel──► cancelled
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from loracore.progress import JOB_KEYS

STATUSES = ("queued", "running", "paused", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running", "paused")  # a job in these holds its adapter name (adapter_busy)
# Every move a job's status may make (the store's writes are compare-and-set on the "from" status).
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "queued": ("running", "cancelled", "paused"),
    "running": ("succeeded", "failed", "cancelled", "queued", "paused"),
    "paused": ("queued", "cancelled"),
    "succeeded": (),
    "failed": (),
    "cancelled": (),
}
# A cancel is accepted in these (a cancelled job answers as it is): queued and paused end at once,
# running is flagged and stopped by its runner. A job that succeeded or failed cannot be cancelled.
CANCELLABLE = ("queued", "running", "paused", "cancelled")
# A pause is accepted in these (a paused job answers as it is): queued pauses at once, running is
# flagged and its runner stops the trainer (it writes a checkpoint), then the job shows paused.
PAUSABLE = ("queued", "running", "paused")
# A resume is accepted in these: paused goes back to the queue; queued and running answer as they are
# (a pause not yet carried out is withdrawn).
RESUMABLE = ("queued", "running", "paused")
PROGRESS_KEYS = JOB_KEYS  # what a job's progress holds (the trainer's line format owns the list)


def cancellable(status: str) -> bool:
    return status in CANCELLABLE


def pausable(status: str) -> bool:
    return status in PAUSABLE


def resumable(status: str) -> bool:
    return status in RESUMABLE


@dataclass
class Job:
    id: str
    adapter: str
    status: str
    error: str | None = None
    overwrite: bool = False
    base_model: str | None = None
    dataset: str | None = None
    num_rows: int = 0
    progress: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = 0.0
    attempts: int = 0
    resume: bool = False
    cancel_requested: bool = False
    pause_requested: bool = False  # running: the runner stops the trainer, then the job is paused
    lease_owner: str | None = None
    lease_expires: float | None = None
    trainer_pid: int | None = None
    eval: dict[str, Any] | None = None  # the served evaluation of the published adapter (validation rows)
    warnings: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True)
class Dataset:
    id: str
    num_rows: int
    size_bytes: int
    sha256: str
    created_at: float


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:20]}"


def new_dataset_id() -> str:
    return f"ds-{uuid.uuid4().hex[:20]}"


# ----------------------------------------------------------------------------- errors


class JobError(Exception):
    """A request the jobs domain refuses: ``code`` says why (``service.errors`` gives its HTTP status),
    ``param`` names the field, the message is for the client."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


class StoreConflict(JobError):
    """A write the store refused (the adapter is in training, an Idempotency-Key was reused)."""

    def __init__(self, code: str, message: str, param: str | None = None, job: Job | None = None):
        super().__init__(code, message, param)
        self.job = job


class StoreUnavailable(JobError):
    """The job store cannot be reached (the database is down or unreachable): retry later."""

    def __init__(self, detail: str):
        super().__init__(
            "job_store_unavailable", "the job store (database) cannot be reached right now; retry later"
        )
        self.detail = detail  # for the server's log: which store, and the driver's reason

    def __str__(self) -> str:
        return self.detail
