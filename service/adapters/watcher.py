"""The adapter watcher: stores folders dropped into the adapter directory by hand as versions.

Uploads and jobs store their version when they publish (``loracore.artifact.publish_version``). A folder
copied into ``<adapter-dir>/<name>/`` by hand is servable at once (resolving it only reads); this
process, started by the main process, scans the directory every ``POLL_S`` seconds and stores each
current folder that is not a stored version yet (``artifact.adopt``: hard links, one copy where links
are impossible), so a later replace by hand leaves it servable as ``name@<id>``, and drops the earlier
versions beyond ``--keep-adapter-versions``. A scan of stored adapters costs one ``stat`` each (the
version id is hashed once per change of the weights file). A failed adoption (a full disk) is
logged once and tried again at the next scan; it changes nothing a request sees.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from contextlib import suppress
from pathlib import Path

from loracore import artifact

log = logging.getLogger(__name__)

POLL_S = 1.0


def scan(adapter_dir: Path, keep: int, failed: dict[str, str] | None = None) -> list[str]:
    """Adopt every folder of the adapter directory that is not a stored version; returns the names
    adopted now. ``failed`` remembers the last failure per name (logged once)."""
    failed = {} if failed is None else failed
    adopted = []
    try:
        entries = sorted(e.name for e in os.scandir(adapter_dir) if e.is_dir(follow_symlinks=False))
    except OSError:
        return []
    for name in entries:
        if name.startswith(".") or not artifact.valid_name(name):
            continue
        try:
            if artifact.adopt(adapter_dir, name, keep) is not None:
                adopted.append(name)
                log.info(
                    "adapter %s: a folder placed by hand is stored as version %s",
                    name,
                    artifact.current_id(adapter_dir, name),
                )
        except OSError as exc:
            message = f"{type(exc).__name__}: {exc}"
            if failed.get(name) != message:
                log.warning("adapter %s: cannot store its folder as a version yet (%s)", name, message)
            failed[name] = message
        else:
            failed.pop(name, None)
    return adopted


# What `ps -o comm`, `top` and /proc/<pid>/comm show for this process (at most 15 bytes), so an operator
# (and a test) can tell it from the other spawned children, whose command lines are all alike.
PROCESS_NAME = "adapter-watcher"


def _name_process(name: str) -> None:
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME (Linux)


def run_watcher(adapter_dir: str, keep: int, log_level: str = "info") -> None:
    """The watcher process: scan until the main process is gone (or terminates it)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _name_process(PROCESS_NAME)
    parent = os.getppid()
    failed: dict[str, str] = {}
    while os.getppid() == parent:  # re-parented: the main process died
        scan(Path(adapter_dir), keep, failed)
        time.sleep(POLL_S)
