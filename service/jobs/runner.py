"""The job runner: one process started by the server; claims queued jobs and runs each in a trainer child.

Each job runs as ``python -m trainer train ...`` in its own session (so its own process group),
with ``PR_SET_PDEATHSIG`` so that it dies with the runner. Accelerate keeps process-wide state and
training can crash or run out of memory; in a child none of that reaches the server.

The loop (single-threaded, every ``POLL_SECONDS``):
  * reads each trainer's new progress lines into the store and the metrics;
  * renews the job's lease (heartbeat) and sees cancellation requests: SIGTERM to the trainer,
    which writes a checkpoint and exits; the job ends ``cancelled``;
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
    trainer (``--yield-file``) waits on between optimizer steps, at most ``train_max_pause`` s a time.
On ``stop_event`` (or SIGTERM/SIGINT, or the parent's death) running trainers get SIGTERM, write a
checkpoint and exit; their jobs go back to the queue and resume on the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing.synchronize
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from loracore.artifact import is_complete
from service.jobs.checkpoints import export as export_checkpoint
from service.jobs.checkpoints import remove_all as remove_checkpoint_versions
from service.jobs.evaluation import served_eval
from service.jobs.files import JobPaths, job_paths, read_progress, tail_text
from service.jobs.publish import PublishError, publish_adapter, published_by
from service.jobs.store import (
    FINISHED,
    PROGRESS_KEYS,
    STATUSES,
    Job,
    JobStore,
    StoreUnavailable,
    make_owner_id,
    owner_is_dead,
    redact,
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

_PR_SET_PDEATHSIG = 1


@dataclass
class _Run:
    job: Job
    paths: JobPaths
    proc: subprocess.Popen
    log_fh: IO[bytes]
    offset: int = 0
    progress: dict[str, Any] = field(default_factory=dict)
    steps_counted: int = 0
    done: bool = False
    error_message: str | None = None
    stop_reason: str | None = None  # "cancel" | "shutdown" | "stall" | "lost"
    term_sent_at: float | None = None
    started: float = field(default_factory=time.monotonic)
    last_heartbeat: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    log_size: int = 0
    yielded_before: float = 0.0  # seconds earlier attempts of the job yielded
    yielded_reported: float = 0.0  # what this trainer reported so far (its count starts at 0)


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


def _die_with_parent_fn():
    """preexec_fn for the trainer: SIGKILL it when the runner dies (Linux), so no orphan trains on."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def _set() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the runner died between fork and prctl
            os._exit(1)

    return _set


def trainer_base(settings: Settings) -> tuple[str, bool]:
    """What to pass as the trainer's ``--model`` (and whether to allow random weights).

    The adapter must fit the base the server serves. A local folder is passed as is. With random
    weights allowed and no real weights found, the server serves the random base it built in its
    model cache; the trainer gets that exact folder rather than building its own.
    """
    if Path(settings.model).expanduser().is_dir():
        return str(Path(settings.model).expanduser()), False
    if settings.allow_random_weights:
        from trainer.model import resolve_base

        cache = getattr(settings, "model_cache_dir", None)
        source = resolve_base(settings.model, allow_random=True, random_cache=cache)
        if source.random_weights:
            return str(source.path), True
    return settings.model, settings.allow_random_weights


def trainer_command(settings: Settings, paths: JobPaths, base: tuple[str, bool]) -> list[str]:
    cmd = [
        sys.executable, "-m", "trainer", "train",
        "--config", str(paths.config),
        "--data", str(paths.data),
        "--output", str(paths.output),
        "--checkpoint-dir", str(paths.checkpoints),
        "--progress-jsonl", str(paths.progress),
        "--model", base[0],
        "--job-id", paths.root.name,
    ]  # fmt: skip
    if paths.val.is_file():
        cmd += ["--val", str(paths.val)]
    if paths.init_adapter.is_dir():
        cmd += ["--init-adapter", str(paths.init_adapter)]
    if base[1]:
        cmd.append("--allow-random-weights")
    if settings.train_yield_rows > 0:
        cmd += ["--yield-file", str(paths.yield_flag), "--max-pause-seconds", str(settings.train_max_pause)]
    if _has_checkpoint(paths.checkpoints):
        cmd.append("--resume")
    return cmd


def trainer_threads(settings: Settings) -> int | None:
    """CPU threads for a trainer child (None: torch's default, all cores).

    Generation on the same CPU gets a core of its own: torch's intra-op pool would otherwise take
    every core and make each decode step wait for a training matmul to finish with them.
    """
    if settings.train_threads:
        return settings.train_threads
    if settings.device == "cpu" and settings.serves_generation:
        return max(1, (os.cpu_count() or 1) - 1)
    return None


def _has_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.startswith("checkpoint-") and p.is_dir() for p in folder.iterdir())


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the trainer leads its own process group (start_new_session)


def _set_flag(path: Path, up: bool) -> None:
    """Create or remove an empty flag file (idempotent; a vanished job folder is not an error)."""
    with contextlib.suppress(OSError):
        if up:
            path.touch(exist_ok=True)
        else:
            path.unlink(missing_ok=True)


def _kill_orphan(job: Job) -> None:
    """A trainer left running by a dead runner (only where PDEATHSIG is unavailable): stop it."""
    pid = job.trainer_pid
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if job.id.encode() in cmdline:
        log.warning("job %s: killing trainer %d left by a runner that died", job.id, pid)
        _kill_group(pid, signal.SIGKILL)


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
            _set_flag(run.paths.yield_flag, busy and run.stop_reason is None)
        if busy != self.yielding:
            self.yielding = busy
            _metrics().TRAIN_YIELDING.set(int(busy))

    def recover(self) -> None:
        for job, new in self.store.recover_stale(MAX_ATTEMPTS, owner_is_dead, skip_owner=self.owner):
            _kill_orphan(job)
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
        cmd = trainer_command(self.settings, paths, self._base)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the trainer exports no metrics of its own
        env.pop("LORASERVE_API_KEY", None)  # nor does it need the server's secret
        if self.settings.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        threads = trainer_threads(self.settings)
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        _set_flag(paths.yield_flag, False)  # a flag left by a runner that died must not pause this run
        log_fh = open(paths.log, "ab")  # noqa: SIM115 (closed when the run ends)
        log_fh.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {' '.join(cmd)}\n".encode())
        log_fh.flush()
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent_fn(),
                close_fds=True,
            )
        except BaseException:
            log_fh.close()
            raise
        offset = paths.progress.stat().st_size if paths.progress.exists() else 0
        step = int(job.progress.get("step") or 0)
        run = _Run(job=job, paths=paths, proc=proc, log_fh=log_fh, offset=offset, steps_counted=step)
        run.progress = dict(job.progress)
        run.yielded_before = float(job.progress.get("yielded_seconds") or 0.0)
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
            elif current.cancel_requested and run.stop_reason is None:
                log.info("job %s: cancel requested; stopping the trainer at its next step", run.job.id)
                self._stop(run, "cancel")
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
            _kill_group(run.proc.pid, signal.SIGKILL)

    def _stop(self, run: _Run, reason: str, sig: int = signal.SIGTERM) -> None:
        run.stop_reason = run.stop_reason or reason
        if run.term_sent_at is None or sig == signal.SIGKILL:
            run.term_sent_at = time.monotonic()
            _kill_group(run.proc.pid, sig)

    def _read_progress(self, run: _Run, now: float) -> None:
        events, run.offset = read_progress(run.paths.progress, run.offset)
        if not events:
            return
        run.last_activity = now
        m = _metrics()
        for _, ev in events:
            for key in PROGRESS_KEYS:
                if key in ev:
                    run.progress[key] = ev[key]
            kind = ev.get("event")
            if kind == "checkpoint" and ev.get("path"):  # servable as <adapter>@<version id>
                try:
                    export_checkpoint(
                        self.settings, run.paths, run.job.adapter, Path(ev["path"]), int(ev.get("step") or 0)
                    )
                except OSError as exc:  # the checkpoint is still a checkpoint: training goes on
                    log.warning("job %s: checkpoint %s not made servable: %s", run.job.id, ev["path"], exc)
            if kind == "done":
                run.done = True
            elif kind == "error":
                run.error_message = str(
                    ev.get("message") or ev.get("error") or "the trainer reported an error"
                )
            if ev.get("yielded_seconds") is not None:  # this trainer's own count: add earlier attempts'
                reported = float(ev["yielded_seconds"])
                if reported > run.yielded_reported:
                    m.TRAIN_YIELD_SECONDS.inc(reported - run.yielded_reported)
                    run.yielded_reported = reported
                run.progress["yielded_seconds"] = round(run.yielded_before + run.yielded_reported, 3)
        step = int(run.progress.get("step") or 0)
        if step > run.steps_counted:
            m.TRAIN_STEPS.inc(step - run.steps_counted)
            run.steps_counted = step
        if run.progress.get("loss") is not None:
            m.TRAIN_LOSS.set(float(run.progress["loss"]))
        if run.progress.get("tokens_per_second") is not None:
            m.TRAIN_TOKENS_PER_SECOND.set(float(run.progress["tokens_per_second"]))
        self.store.update_progress(run.job.id, self.owner, run.progress)

    def _finished(self, run: _Run, rc: int) -> None:
        del self.runs[run.job.id]
        run.log_fh.close()
        _set_flag(run.paths.yield_flag, False)
        job, reason = run.job, run.stop_reason
        if reason == "lost":
            return
        if rc == 0 and is_complete(run.paths.output):
            self._publish(job, run.paths)
            return
        if reason == "cancel":
            self._end(job, "cancelled", None)
            return
        if reason == "shutdown":
            try:
                released = self.store.release(job.id, self.owner)
            except StoreUnavailable:
                log.warning(
                    "job %s: stopped for shutdown, but the job store is unreachable: its lease expires "
                    "and a runner resumes it from its last checkpoint",
                    job.id,
                )
                return
            if released:
                log.info("job %s: stopped for shutdown; it resumes on the next start", job.id)
            else:  # a cancel arrived meanwhile
                self._end(job, "cancelled", None)
            return
        self._end(job, "failed", self._failure_reason(run, rc))

    def _failure_reason(self, run: _Run, rc: int) -> str:
        if run.stop_reason == "stall":
            return f"the trainer made no progress for {STALL_SECONDS:.0f} s and was killed"
        if rc < 0:
            why = f"the training process was killed by {_signal_name(rc)}"
            if rc == -signal.SIGKILL:
                why += " (out of memory, or killed by someone)"
            return why + (f"; last error: {run.error_message}" if run.error_message else "")
        if run.error_message:
            return run.error_message
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
            _kill_group(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
            self._finished(run, run.proc.returncode)


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
