"""What the harness reads of other processes, all from ``/proc`` (Linux): group members, liveness,
names, command lines, resident memory, and which process is a job's trainer."""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int | str) -> tuple[str, list[str]] | None:
    """(command name, the fields after it: state, ppid, pgrp, ...) of ``/proc/<pid>/stat``; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def alive(pid: int) -> bool:
    """The process exists and is neither a zombie nor dead."""
    found = _stat_fields(pid)
    return found is not None and found[1][0] not in "ZX"


def comm(pid: int) -> str:
    """The process's name (``/proc/<pid>/comm``, what ``ps -o comm`` shows); "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> str:
    """The process's command line, arguments joined by spaces; "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return ""


def group_members(pgid: int) -> list[tuple[int, str]]:
    """Live (non-zombie) processes in process group ``pgid``, as (pid, command name)."""
    found = []
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields is None:
            continue
        name, (state, _ppid, pgrp, *_) = fields
        if int(pgrp) == pgid and state != "Z":
            found.append((pid, name))
    return found


def group_rss(pgid: int) -> int:
    """Resident bytes of every live process in process group ``pgid``."""
    total = 0
    for pid, _ in group_members(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


def trainer_pid(job_id: str) -> int | None:
    """The trainer process of a job (its command line names the job's folder)."""
    for pid in _pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"trainer" in cmd and any(job_id.encode() in part for part in cmd) and b"train" in cmd:
            return pid
    return None
