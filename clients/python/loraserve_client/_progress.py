"""How ``wait(progress=...)`` shows a training job: a tqdm bar, a plain line, or the caller's callback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from .types import Job

ProgressArg = bool | Callable[[Job], None]


class ProgressDisplay:
    """What ``wait(progress=...)`` shows: a tqdm bar when tqdm is importable, else one plain line (rewritten
    in place on a terminal, one line per change otherwise). A callable gets every polled ``Job`` instead."""

    def __init__(self, progress: ProgressArg, stream: TextIO | None = None):
        self._callback = progress if callable(progress) else None
        self._enabled = bool(progress)
        self._stream = stream or sys.stderr
        self._bar: Any = None
        self._last = ""
        self._tqdm: Any = None
        if self._enabled and self._callback is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            self._tqdm = tqdm

    def update(self, job: Job) -> None:
        if self._callback is not None:
            self._callback(job)
        elif self._enabled and self._tqdm is not None:
            self._update_bar(job)
        elif self._enabled:
            self._update_line(job)

    def _update_bar(self, job: Job) -> None:
        p = job.progress
        if self._bar is None:
            self._bar = self._tqdm(
                total=None, unit="step", desc=f"train {job.adapter}", file=self._stream, dynamic_ncols=True
            )
        bar = self._bar
        if p is not None and p.total_steps and bar.total != p.total_steps:
            bar.total = p.total_steps
        if p is not None and p.step is not None:
            bar.n = p.step
        postfix = {"status": job.status}
        if p is not None and p.loss is not None:
            postfix["loss"] = f"{p.loss:.4f}"
        bar.set_postfix(postfix, refresh=False)
        bar.refresh()

    def _update_line(self, job: Job) -> None:
        line = describe_job(job)
        if line == self._last:
            return
        tty = self._stream.isatty()
        if tty:
            self._stream.write("\r" + line.ljust(len(self._last)))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
        self._last = line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._last and self._stream.isatty():
            self._stream.write("\n")
            self._stream.flush()


def describe_job(job: Job) -> str:
    """One line: ``pirate [job-1] running step 12/40 epoch 0.60 loss 2.3140 eta 9s``."""
    parts = [f"{job.adapter} [{job.job_id}] {job.status}"]
    p = job.progress
    if p is not None:
        if p.step is not None:
            parts.append(f"step {p.step}/{p.total_steps or '?'}")
        if p.epoch is not None:
            parts.append(f"epoch {p.epoch:.2f}")
        if p.loss is not None:
            parts.append(f"loss {p.loss:.4f}")
        if p.eta_seconds is not None and job.status == "running":
            parts.append(f"eta {p.eta_seconds:.0f}s")
    if job.error:
        parts.append(f"error: {job.error}")
    return " ".join(parts)
