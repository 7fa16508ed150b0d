"""The trainer child of a job: its command line, environment, process, signals and progress tail.

Each job runs as ``python -m trainer train ...`` in its own session (so its own process group),
with ``PR_SET_PDEATHSIG`` so that it dies with the runner. Accelerate keeps process-wide state and
training can crash or run out of memory; in a child none of that reaches the server.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from service.jobs.files import JobPaths, read_progress
from service.jobs.lease import process_cmdline
from service.jobs.model import PROGRESS_KEYS, Job
from service.settings import Settings

log = logging.getLogger("loraserve.jobs")

_PR_SET_PDEATHSIG = 1


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
        cmd += [
            "--yield-file", str(paths.yield_flag),
            "--max-pause-seconds", str(settings.train_max_pause),
            "--min-train-share", str(settings.train_min_share),
        ]  # fmt: skip
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


def generation_threads(settings: Settings) -> int | None:
    """CPU threads the generation worker keeps while a trainer child runs beside it (None: no change).

    Measured on 2 cores (docs/jobs.md, "CPU threads"): a two-thread decode step waits on the thread that
    shares its core with the trainer, about 2.5x slower, where one thread of its own is about 1.1x slower
    than two on an idle CPU.
    """
    threads = trainer_threads(settings)
    if threads is None or settings.device != "cpu" or not settings.serves_generation:
        return None
    return max(1, (os.cpu_count() or 1) - threads)


def trainer_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the trainer exports no metrics of its own
    env.pop("LORASERVE_API_KEY", None)  # nor does it need the server's secret
    if settings.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    threads = trainer_threads(settings)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def start_trainer(
    settings: Settings, paths: JobPaths, base: tuple[str, bool]
) -> tuple[subprocess.Popen, IO[bytes]]:
    """Start the trainer of a job; returns the process and its open log file (the caller closes it)."""
    cmd = trainer_command(settings, paths, base)
    set_flag(paths.yield_flag, False)  # a flag left by a runner that died must not pause this run
    log_fh = open(paths.log, "ab")  # noqa: SIM115 (closed when the run ends)
    log_fh.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {' '.join(cmd)}\n".encode())
    log_fh.flush()
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            env=trainer_env(settings),
            start_new_session=True,
            preexec_fn=_die_with_parent_fn(),
            close_fds=True,
        )
    except BaseException:
        log_fh.close()
        raise
    return proc, log_fh


def _has_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.startswith("checkpoint-") and p.is_dir() for p in folder.iterdir())


def signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the trainer leads its own process group (start_new_session)


def set_flag(path: Path, up: bool) -> None:
    """Create or remove an empty flag file (idempotent; a vanished job folder is not an error)."""
    with contextlib.suppress(OSError):
        if up:
            path.touch(exist_ok=True)
        else:
            path.unlink(missing_ok=True)


def kill_orphan(job: Job) -> None:
    """A trainer left running by a dead runner (only where PDEATHSIG is unavailable): stop it."""
    pid = job.trainer_pid
    if not pid:
        return
    cmdline = process_cmdline(pid)
    if cmdline is not None and job.id.encode() in cmdline:
        log.warning("job %s: killing trainer %d left by a runner that died", job.id, pid)
        kill_group(pid, signal.SIGKILL)


@dataclass
class ProgressTail:
    """What a trainer reported so far, read from its progress lines as they grow."""

    offset: int  # bytes of the progress file read
    progress: dict[str, Any] = field(default_factory=dict)  # the job's progress (PROGRESS_KEYS)
    done: bool = False  # the trainer said "done"
    error_message: str | None = None  # the trainer's "error" line
    yielded_before: float = 0.0  # seconds earlier attempts of the job yielded
    yielded_reported: float = 0.0  # what this trainer reported so far (its count starts at 0)
    checkpoints: list[tuple[Path, int]] = field(default_factory=list)  # saved, not yet taken: (path, step)

    @classmethod
    def resume(cls, job: Job, path: Path) -> ProgressTail:
        """A tail that starts after the lines earlier attempts wrote, with the job's progress so far."""
        offset = path.stat().st_size if path.exists() else 0
        return cls(
            offset=offset,
            progress=dict(job.progress),
            yielded_before=float(job.progress.get("yielded_seconds") or 0.0),
        )

    def read(self, path: Path) -> tuple[int, float]:
        """Fold the new lines in; returns (how many, seconds yielded since the last read)."""
        events, self.offset = read_progress(path, self.offset)
        yielded = 0.0
        for _, ev in events:
            for key in PROGRESS_KEYS:
                if key in ev:
                    self.progress[key] = ev[key]
            kind = ev.get("event")
            if kind == "checkpoint" and ev.get("path"):
                self.checkpoints.append((Path(ev["path"]), int(ev.get("step") or 0)))
            if kind == "done":
                self.done = True
            elif kind == "error":
                self.error_message = str(
                    ev.get("message") or ev.get("error") or "the trainer reported an error"
                )
            if ev.get("yielded_seconds") is not None:  # this trainer's own count: add earlier attempts'
                reported = float(ev["yielded_seconds"])
                if reported > self.yielded_reported:
                    yielded += reported - self.yielded_reported
                    self.yielded_reported = reported
                self.progress["yielded_seconds"] = round(self.yielded_before + self.yielded_reported, 3)
        return len(events), yielded

    def take_checkpoints(self) -> list[tuple[Path, int]]:
        """The checkpoints the trainer saved since the last call (oldest first)."""
        taken, self.checkpoints = self.checkpoints, []
        return taken
