"""The job runner: one process started by the server; claims queued jobs and runs each in a trainer child.

This module is the state machine (``service.jobs.model`` draws it); the child process itself (command
line, environment, signals, progress tail) is ``service.jobs.trainer_process``, the store
``service.jobs.sql``, lease owners and process liveness ``service.jobs.lease``.

The loop (single-threaded, every ``POLL_SECONDS``):
  * reads each trainer's new progress lines into the store and the metrics;
  * renews the job's lease (heartbeat) and sees cancel and pause requests: SIGTERM to the trainer,
    which writes a checkpoint and exits; the job ends ``cancelled``, or shows ``paused`` (its slot
    free) until resumed, when it goes back to the queue and resumes from that checkpoint;
  * notices exited trainers: success -> rename the verified adapter into place -> with validation rows,
    the served evaluation (``service.jobs.evaluation``: this server's ``POST /eval``, in a thread while
    the loop goes on) -> ``succeeded``; any other end -> ``failed`` with the reason (the trainer's
    error line, the signal that killed it, or the log's last lines);
  * requeues jobs whose runner died (expired lease, or a dead process on this host) so they resume
    from their last checkpoint, failing them after ``MAX_ATTEMPTS`` interrupted runs;
  * claims queued jobs while fewer than ``settings.max_concurrent_jobs`` run (counted across runners)
    and this runner has fewer than ``settings.runner_slots``;
  * serving first: while the generation worker's status file shows it busy
    (``service.worker_status.serving_busy``), creates each running job's ``yield`` file, which the
    trainer (``--yield-file``) waits on between optimizer steps, at most ``train_max_pause`` s a time
    and never so long that it trains less than ``train_min_share`` of the time (``YieldGate``).
On ``stop_event`` (or SIGTERM/SIGINT, or the parent's death) running trainers get SIGTERM, write a
checkpoint and exit; their jobs go back to the queue and resume on the next start.
"""

from __future__ import annotations

import logging
import multiprocessing.synchronize
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

from loracore.artifact import is_complete
from loracore.atomic import write_atomic
from service.jobs.checkpoints import export as export_checkpoint
from service.jobs.checkpoints import remove_all as remove_checkpoint_versions
from service.jobs.evaluation import served_eval
from service.jobs.files import JobPaths, job_paths, tail_text
from service.jobs.lease import make_owner_id, owner_is_dead
from service.jobs.model import FINISHED, STATUSES, Job, StoreUnavailable
from service.jobs.publish import PublishError, publish_adapter, published_by
from service.jobs.sql import JobStore, redact
from service.jobs.trainer_process import (
    ProgressTail,
    generation_threads,
    kill_group,
    kill_orphan,
    set_flag,
    signal_name,
    start_trainer,
    trainer_base,
)
from service.settings import Settings
from service.worker_status import read_load, read_status, serving_busy

log = logging.getLogger("loraserve.jobs")

POLL_SECONDS = 0.25
HEARTBEAT_SECONDS = 1.0  # also how quickly a cancel request reaches the trainer
LEASE_SECONDS = 15.0  # a runner silent this long has lost its jobs to the next runner
RECOVER_SECONDS = 2.0
METRICS_SECONDS = 2.0
STOP_GRACE_SECONDS = 8.0  # SIGTERM -> checkpoint -> exit, then SIGKILL (the server waits 10 s for the runner)
MAX_ATTEMPTS = 3  # runs of one job cut short by a dying runner before the job fails
STORE_RETRY_SECONDS = 1.0  # how often a runner retries an unreachable job store
STALL_SECONDS = 1800.0  # a trainer that writes neither progress nor log for this long is killed


@dataclass
class _Run:
    job: Job
    paths: JobPaths
    proc: subprocess.Popen
    log_fh: IO[bytes]
    tail: ProgressTail
    steps_counted: int = 0
    stop_reason: str | None = None  # "cancel" | "pause" | "shutdown" | "stall" | "lost"
    term_sent_at: float | None = None
    started: float = field(default_factory=time.monotonic)
    last_heartbeat: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    log_size: int = 0


@dataclass
class _Eval:
    """A published job waiting for its served evaluation; ``result`` is set by the thread when done."""

    job: Job
    result: tuple[dict[str, Any] | None, list[str]] | None = None
    last_heartbeat: float = field(default_factory=time.monotonic)


def _metrics():
    # Imported lazily: the server sets PROMETHEUS_MULTIPROC_DIR before starting this process.
    from service import metrics

    return metrics


class Runner:
    """The runner's state; ``run_runner`` drives it. Tests may drive ``tick`` directly."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = JobStore(settings.jobs_db)
        self.owner = make_owner_id()
        self.runs: dict[str, _Run] = {}
        self.evals: dict[str, _Eval] = {}
        self._base: tuple[str, bool] | None = None
        self._last_recover = 0.0
        self._last_metrics = 0.0
        self.yielding = False  # whether the yield files are up
        self.generation_threads: int | None = None  # as last written for the generation worker
        settings.generation_threads_path.unlink(missing_ok=True)  # a previous runner's word
        # Final states (``_end`` arguments) that could not be written while the store was unreachable.
        self.pending: list[tuple] = []
        self.pending_logged: set[str] = set()

    # --- one pass of the loop ------------------------------------------------------------------
    def tick(self, *, claim: bool = True) -> None:
        now = time.monotonic()
        pending, self.pending = self.pending, []
        for args in pending:  # first what waited for the store to come back
            self._end(*args)
        for run in list(self.runs.values()):
            self._poll(run, now)
        for ev in list(self.evals.values()):
            self._poll_eval(ev, now)
        self._update_yield()
        if now - self._last_recover >= RECOVER_SECONDS:
            self._last_recover = now
            self.recover()
        if claim:
            while len(self.runs) < self.settings.runner_slots and self._claim_one():
                pass
        if now - self._last_metrics >= METRICS_SECONDS:
            self._last_metrics = now
            self._update_gauges()

    def _update_yield(self) -> None:
        """Serving first: raise every running job's yield file while the generation worker is busy."""
        busy = bool(self.runs) and serving_busy(
            read_load(read_status(self.settings.worker_status_path)), self.settings.train_yield_rows
        )
        for run in self.runs.values():
            set_flag(run.paths.yield_flag, busy and run.stop_reason is None)
        if busy != self.yielding:
            self.yielding = busy
            _metrics().TRAIN_YIELDING.set(int(busy))
        # while a trainer works beside generation on the CPU, generation keeps cores of its own
        threads = generation_threads(self.settings) if self.runs else None
        if threads != self.generation_threads:
            path = self.settings.generation_threads_path
            if threads is None:
                path.unlink(missing_ok=True)
            else:
                write_atomic(path, str(threads), durable=False)
            self.generation_threads = threads

    def recover(self) -> None:
        for job, new in self.store.recover_stale(MAX_ATTEMPTS, owner_is_dead, skip_owner=self.owner):
            kill_orphan(job)
            log.warning("job %s: its runner is gone; now %s", job.id, new)
            if new in FINISHED:
                self._count_finished(job, new)

    def _claim_one(self) -> bool:
        job = self.store.claim_next(self.owner, LEASE_SECONDS, self.settings.max_concurrent_jobs)
        if job is None:
            return False
        try:
            self._start(job)
        except Exception as exc:  # a job that cannot start fails; the runner goes on
            log.exception("job %s: could not start the trainer", job.id)
            self._end(job, "failed", f"could not start the trainer: {type(exc).__name__}: {exc}")
        return True

    def _start(self, job: Job) -> None:
        paths = job_paths(self.settings, job.id)
        final = self.settings.adapter_dir / job.adapter
        # The runner may have died after the trainer finished: publish what is there, do not retrain.
        if published_by(final, job.id):
            self._published(job, paths)
            return
        if is_complete(paths.output):
            log.info("job %s: publishing the output of an earlier run", job.id)
            self._publish(job, paths)
            return
        if not paths.data.is_file() or not paths.config.is_file():
            self._end(job, "failed", f"the job's files are missing from {paths.root}")
            return
        if self._base is None:
            self._base = trainer_base(self.settings)
        proc, log_fh = start_trainer(self.settings, paths, self._base)
        tail = ProgressTail.resume(job, paths.progress)
        step = int(job.progress.get("step") or 0)
        run = _Run(job=job, paths=paths, proc=proc, log_fh=log_fh, tail=tail, steps_counted=step)
        self.runs[job.id] = run  # from here on the loop owns the child, whatever happens next
        try:
            self.store.set_trainer_pid(job.id, self.owner, proc.pid)
        except Exception:  # only used to clean up orphans; the run goes on without it
            log.exception("job %s: could not record the trainer's pid", job.id)
        log.info(
            "job %s: training adapter %r (attempt %d, pid %d)", job.id, job.adapter, job.attempts, proc.pid
        )

    def _poll(self, run: _Run, now: float) -> None:
        self._read_progress(run, now)
        rc = run.proc.poll()
        if rc is not None:
            self._read_progress(run, now)
            self._finished(run, rc)
            return
        if now - run.last_heartbeat >= HEARTBEAT_SECONDS:
            run.last_heartbeat = now
            current = self.store.heartbeat(run.job.id, self.owner, LEASE_SECONDS)
            if current is None:  # someone took the job over: stop training it here
                log.warning("job %s: lease lost; stopping its trainer", run.job.id)
                self._stop(run, "lost", signal.SIGKILL)
            elif current.cancel_requested and run.stop_reason in (None, "pause"):
                log.info("job %s: cancel requested; stopping the trainer at its next step", run.job.id)
                run.stop_reason = None  # a cancel overrides a pause under way
                self._stop(run, "cancel")
            elif current.pause_requested and run.stop_reason is None:
                log.info("job %s: pause requested; checkpointing and stopping the trainer", run.job.id)
                self._stop(run, "pause")
        try:
            size = run.paths.log.stat().st_size
        except OSError:
            size = run.log_size
        if size != run.log_size:
            run.log_size, run.last_activity = size, now
        if run.stop_reason is None and now - run.last_activity > STALL_SECONDS:
            log.warning("job %s: no progress for %.0f s; killing the trainer", run.job.id, STALL_SECONDS)
            self._stop(run, "stall", signal.SIGKILL)
        if run.term_sent_at is not None and now - run.term_sent_at > STOP_GRACE_SECONDS:
            kill_group(run.proc.pid, signal.SIGKILL)

    def _stop(self, run: _Run, reason: str, sig: int = signal.SIGTERM) -> None:
        run.stop_reason = run.stop_reason or reason
        if run.term_sent_at is None or sig == signal.SIGKILL:
            run.term_sent_at = time.monotonic()
            kill_group(run.proc.pid, sig)

    def _read_progress(self, run: _Run, now: float) -> None:
        lines, yielded = run.tail.read(run.paths.progress)
        if not lines:
            return
        run.last_activity = now
        m = _metrics()
        if yielded:
            m.TRAIN_YIELD_SECONDS.inc(yielded)
        for path, ckpt_step in run.tail.take_checkpoints():  # servable as <adapter>@<version id>
            try:
                export_checkpoint(self.settings, run.paths, run.job.adapter, path, ckpt_step)
            except OSError as exc:  # the checkpoint is still a checkpoint: training goes on
                log.warning("job %s: checkpoint %s not made servable: %s", run.job.id, path, exc)
        progress = run.tail.progress
        step = int(progress.get("step") or 0)
        if step > run.steps_counted:
            m.TRAIN_STEPS.inc(step - run.steps_counted)
            run.steps_counted = step
        if progress.get("loss") is not None:
            m.TRAIN_LOSS.set(float(progress["loss"]))
        if progress.get("tokens_per_second") is not None:
            m.TRAIN_TOKENS_PER_SECOND.set(float(progress["tokens_per_second"]))
        self.store.update_progress(run.job.id, self.owner, progress)

    def _finished(self, run: _Run, rc: int) -> None:
        del self.runs[run.job.id]
        run.log_fh.close()
        set_flag(run.paths.yield_flag, False)
        job, reason = run.job, run.stop_reason
        if reason == "lost":
            return
        if rc == 0 and is_complete(run.paths.output):
            self._publish(job, run.paths)
            return
        if reason == "cancel":
            self._end(job, "cancelled", None)
            return
        if reason in ("shutdown", "pause"):  # a checkpoint was written: queued, or paused if asked
            try:
                released = self.store.release(job.id, self.owner)
            except StoreUnavailable:
                log.warning(
                    "job %s: stopped for %s, but the job store is unreachable: its lease expires "
                    "and a runner resumes (or pauses) it from its last checkpoint",
                    job.id,
                    reason,
                )
                return
            if released:
                log.info("job %s: stopped for %s; it resumes from its checkpoint", job.id, reason)
            else:  # a cancel arrived meanwhile
                self._end(job, "cancelled", None)
            return
        self._end(job, "failed", self._failure_reason(run, rc))

    def _failure_reason(self, run: _Run, rc: int) -> str:
        if run.stop_reason == "stall":
            return f"the trainer made no progress for {STALL_SECONDS:.0f} s and was killed"
        if rc < 0:
            why = f"the training process was killed by {signal_name(rc)}"
            if rc == -signal.SIGKILL:
                why += " (out of memory, or killed by someone)"
            return why + (f"; last error: {run.tail.error_message}" if run.tail.error_message else "")
        if run.tail.error_message:
            return run.tail.error_message
        if rc == 0:
            return f"the trainer exited without producing an adapter in {run.paths.output}"
        lines = [ln for ln in tail_text(run.paths.log, 4000).splitlines() if ln.strip()]
        return f"the trainer exited with status {rc}: " + (" | ".join(lines[-3:]) or "no output")

    def _publish(self, job: Job, paths: JobPaths) -> None:
        final = self.settings.adapter_dir / job.adapter
        try:
            sha = publish_adapter(
                paths.output,
                final,
                job.id,
                overwrite=job.overwrite,
                keep=self.settings.keep_adapter_versions,
            )
        except (PublishError, OSError) as exc:
            self._end(job, "failed", f"publishing the adapter failed: {exc}")
            return
        log.info("job %s: published adapter %r (sha256 %s)", job.id, job.adapter, sha[:12])
        self._published(job, paths)

    def _published(self, job: Job, paths: JobPaths) -> None:
        """The adapter is in place: succeed now, or with validation rows after the served evaluation."""
        if not paths.val.is_file():
            self._end(job, "succeeded", None)
            return
        ev = _Eval(job)

        def evaluate() -> None:
            try:
                ev.result = served_eval(self.settings, job.adapter, paths.val)
            except Exception as exc:  # a surprise in the answer must not leave the job running forever
                log.exception("job %s: served evaluation failed", job.id)
                ev.result = (None, [f"no served evaluation: {type(exc).__name__}: {exc}"])

        self.evals[job.id] = ev
        log.info("job %s: evaluating adapter %r on its validation rows (POST /eval)", job.id, job.adapter)
        threading.Thread(target=evaluate, name=f"eval-{job.id}", daemon=True).start()

    def _poll_eval(self, ev: _Eval, now: float) -> None:
        if ev.result is None:
            if now - ev.last_heartbeat >= HEARTBEAT_SECONDS:  # keep the lease while the server answers
                ev.last_heartbeat = now
                if self.store.heartbeat(ev.job.id, self.owner, LEASE_SECONDS) is None:
                    log.warning("job %s: lease lost during its evaluation", ev.job.id)
                    del self.evals[ev.job.id]
            return
        del self.evals[ev.job.id]
        report, warnings = ev.result
        for warning in warnings:
            log.warning("job %s: %s", ev.job.id, warning)
        self._end(ev.job, "succeeded", None, report, warnings)

    def _end(
        self,
        job: Job,
        status: str,
        error: str | None,
        report: dict[str, Any] | None = None,
        warnings: list[str] | None = None,
    ) -> None:
        try:
            ended = self.store.finish(
                job.id, self.owner, status, error, eval_report=report, warnings=warnings
            )
        except StoreUnavailable:
            if job.id not in self.pending_logged:
                self.pending_logged.add(job.id)
                log.warning(
                    "job %s: %s, but the job store is unreachable: recorded once it is back", job.id, status
                )
            self.pending.append((job, status, error, report, warnings))
            return
        self.pending_logged.discard(job.id)
        if ended is None:
            log.warning("job %s: lease lost before it could be marked %s", job.id, status)
            return
        log.info("job %s: %s%s", job.id, status, f" ({error})" if error else "")
        self._count_finished(ended, status)
        paths = job_paths(self.settings, job.id)
        # Checkpoints only serve a resume, and nothing resumes a finished job; a failed job keeps them
        # (with its log) for whoever looks into the failure. A staged output that was not published goes.
        if status != "failed":
            shutil.rmtree(paths.checkpoints, ignore_errors=True)
        if status == "cancelled":  # its servable checkpoints go too; a published or failed job's stay
            remove_checkpoint_versions(self.settings, paths, job.adapter)
        shutil.rmtree(paths.output, ignore_errors=True)

    def _count_finished(self, job: Job, status: str) -> None:
        m = _metrics()
        m.TRAIN_JOBS_FINISHED.labels(status=status).inc()
        if job.started_at is not None:
            m.TRAIN_JOB_SECONDS.observe(max(0.0, time.time() - job.started_at))
        self._last_metrics = 0.0  # refresh the by-status gauge on the next tick

    def _update_gauges(self) -> None:
        m = _metrics()
        counts = self.store.counts()
        for status in STATUSES:
            m.TRAIN_JOBS.labels(status=status).set(counts.get(status, 0))

    # --- shutdown ------------------------------------------------------------------------------
    def shutdown(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM every trainer (each checkpoints and exits), wait, requeue their jobs."""
        for run in self.runs.values():
            self._stop(run, "shutdown")
        deadline = time.monotonic() + grace
        while self.runs and time.monotonic() < deadline:
            self.tick(claim=False)
            time.sleep(POLL_SECONDS)
        for run in list(self.runs.values()):
            kill_group(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
            self._finished(run, run.proc.returncode)
        self.settings.generation_threads_path.unlink(missing_ok=True)


def run_runner(settings: Settings, stop_event: multiprocessing.synchronize.Event) -> None:
    """Loop until ``stop_event`` is set, running queued training jobs."""
    if not logging.getLogger().handlers:  # a spawned process starts without the server's logging setup
        logging.basicConfig(
            level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    outage = _Outage(settings)
    runner = None
    while runner is None and not (stop.is_set() or stop_event.is_set()):
        try:
            runner = Runner(settings)
            runner.recover()  # jobs of a runner that died go back to the queue (or fail) first
        except StoreUnavailable as exc:  # the database is not up yet: wait for it, as in an outage
            runner = None
            outage.down(exc)
            stop_event.wait(STORE_RETRY_SECONDS)
    if runner is None:
        return
    outage.up()
    log.info(
        "job runner started (owner %s, up to %d job(s) at once, %d across runners)",
        runner.owner,
        settings.runner_slots,
        settings.max_concurrent_jobs,
    )
    try:
        while not (stop.is_set() or stop_event.is_set()):
            if os.getppid() != parent:
                log.warning("job runner: the server process is gone; stopping")
                break
            try:
                runner.tick()
                outage.up()
            except StoreUnavailable as exc:
                outage.down(exc)
                time.sleep(STORE_RETRY_SECONDS)
            except Exception:  # a store hiccup (disk full, locked too long) must not end the runner
                log.exception("job runner: tick failed; retrying")
                time.sleep(1.0)
            stop_event.wait(POLL_SECONDS)
    finally:
        runner.shutdown()
        log.info("job runner stopped")


class _Outage:
    """One log line when the job store goes away and one when it is back (not one per tick)."""

    def __init__(self, settings: Settings):
        self.store = redact(settings.jobs_db or "")
        self.since: float | None = None

    def down(self, exc: StoreUnavailable) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning(
                "job runner: job store %s unreachable (%s). Running trainers go on; claims, progress "
                "and results wait until it is back (retrying every %.0f s)",
                self.store,
                exc.detail,
                STORE_RETRY_SECONDS,
            )

    def up(self) -> None:
        if self.since is not None:
            log.warning(
                "job runner: job store %s reachable again after %.0f s",
                self.store,
                time.monotonic() - self.since,
            )
            self.since = None
