"""Pinned adapters: the names the generation worker keeps loaded and never evicts.

Stored beside the adapters as ``<adapter-dir>/.pins.json`` (``{"pinned": [names, sorted]}``), so pins
survive a worker or server restart. A pin changes only by the explicit admin action
(``PUT|DELETE /adapters/{name}/pin``, an upload's ``pinned`` field, a delete): the file is rewritten
atomically (``loracore.atomic``) under an exclusive lock on ``.pins.lock``, so two API processes
cannot lose each other's change. The worker only reads it (``read``), on every pass of its loop
when the file changed (``PinsFile``), and loads what it names (``engine.cache.AdapterCache.sync_pins``).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loracore.artifact import valid_name
from loracore.atomic import write_atomic
from service.errors import domain_error

PINS_FILE = ".pins.json"
LOCK_FILE = ".pins.lock"


def read(adapter_dir: str | Path) -> frozenset[str]:
    """The pinned names; none when the file is missing or unreadable (invalid names are skipped)."""
    try:
        data = json.loads((Path(adapter_dir) / PINS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return frozenset()
    names = data.get("pinned") if isinstance(data, dict) else None
    return frozenset(n for n in names or () if isinstance(n, str) and valid_name(n))


@contextmanager
def _locked(adapter_dir: Path) -> Iterator[None]:
    adapter_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(adapter_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write(adapter_dir: Path, names: frozenset[str]) -> None:
    write_atomic(adapter_dir / PINS_FILE, json.dumps({"pinned": sorted(names)}, indent=2) + "\n")


def check_room(adapter_dir: str | Path, name: str, limit: int) -> None:
    """409 ``adapter_pin_limit`` when pinning ``name`` would pin more adapters than the cache holds."""
    pinned = read(adapter_dir)
    if name not in pinned and len(pinned) + 1 > limit:
        raise domain_error(
            "adapter_pin_limit",
            f"cannot pin {name!r}: {len(pinned)} adapters are pinned and the adapter cache holds "
            f"{limit} (--max-loaded-adapters {limit}); unpin one first ({', '.join(sorted(pinned))})",
            "name",
        )


def pin(adapter_dir: str | Path, name: str, limit: int) -> bool:
    """Pin ``name`` (checked by the caller to exist); False when it already was. 409 past ``limit``."""
    adapter_dir = Path(adapter_dir)
    with _locked(adapter_dir):
        pinned = read(adapter_dir)
        if name in pinned:
            return False
        check_room(adapter_dir, name, limit)
        _write(adapter_dir, pinned | {name})
    return True


def unpin(adapter_dir: str | Path, name: str) -> bool:
    """Unpin ``name``; False when it was not pinned (nothing is written then)."""
    adapter_dir = Path(adapter_dir)
    if name not in read(adapter_dir):  # nothing to change: nothing written, not even the lock file
        return False
    with _locked(adapter_dir):
        pinned = read(adapter_dir)
        if name not in pinned:
            return False
        _write(adapter_dir, pinned - {name})
    return True


class PinsFile:
    """What the worker reads: the pins, re-read only when the file's stat changed."""

    def __init__(self, adapter_dir: str | Path) -> None:
        self.path = Path(adapter_dir) / PINS_FILE
        self._stat: tuple[int, int, int] | None = None
        self.names: frozenset[str] = frozenset()

    def changed(self) -> bool:
        """Re-read the file if it changed since the last call; True when the names changed."""
        try:
            st = self.path.stat()
            stat = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stat = None
        if stat == self._stat:
            return False
        self._stat = stat
        names = read(self.path.parent)
        if names == self.names:
            return False
        self.names = names
        return True
