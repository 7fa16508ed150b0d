"""Who holds a running job, and whether that process still lives: every ``/proc`` read of the job system.

A runner's lease owner id is ``host|pid|start time|token``: the pid's kernel start time tells a reused
pid from the process that took the lease, so a job of a runner that died is requeued at once on its own
host instead of when its lease expires.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path


def proc_start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (Linux), so a reused pid is not mistaken for the old process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields and fields[0] in ("Z", "X"):  # zombie or dead: not running any more
        return None
    return fields[19] if len(fields) > 19 else None


def process_cmdline(pid: int) -> bytes | None:
    """The command line of ``pid`` (NUL-separated), or None when it is gone or unreadable."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def make_owner_id() -> str:
    """Lease owner id of this process: host, pid, the pid's start time and a random token."""
    pid = os.getpid()
    return f"{socket.gethostname()}|{pid}|{proc_start_time(pid) or '-'}|{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str | None) -> bool:
    """True when ``owner`` ran on this host and that process is gone (False when unsure: leases expire)."""
    if not owner:
        return True
    parts = owner.split("|")
    if len(parts) != 4 or parts[0] != socket.gethostname():
        return False
    pid, started = int(parts[1]), parts[2]
    if Path("/proc").is_dir():
        now = proc_start_time(pid)
        return now is None or (started != "-" and now != started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
