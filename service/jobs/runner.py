"""The job runner: one process started by the server; claims queued jobs and runs each in a trainer child."""

from __future__ import annotations

import multiprocessing.synchronize

from service.settings import Settings


def run_runner(settings: Settings, stop_event: multiprocessing.synchronize.Event) -> None:
    """Loop until ``stop_event`` is set, running queued training jobs."""
    while not stop_event.wait(1.0):
        pass
