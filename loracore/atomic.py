"""Atomic publication of folders (adapters, datasets): a name is absent or complete.

Writers build the folder under a staging directory on the same filesystem, fsync it, then
rename it in. Replacing an existing folder uses ``renameat2(RENAME_EXCHANGE)`` on Linux so
readers never see the name missing; elsewhere it falls back to two renames.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import uuid
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths. False where the kernel or filesystem cannot."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def fsync_tree(path: Path) -> None:
    """Flush every file in ``path`` and the folder entries themselves to disk."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def staging_dir(root: Path, label: str) -> Path:
    """A fresh folder under ``root/.staging`` (same filesystem as ``root``, so rename works)."""
    path = root / ".staging" / f"{label}-{uuid.uuid4().hex[:12]}"
    path.mkdir(parents=True)
    return path


def publish_dir(staging: Path, final: Path) -> None:
    """Move a complete folder to ``final``, replacing what was there, atomically where possible."""
    fsync_tree(staging)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and _exchange(staging, final):
        # staging now holds the old version; readers that opened files there keep them.
        shutil.rmtree(staging, ignore_errors=True)
    else:
        if final.exists():
            old = final.parent / ".staging" / f"old-{final.name}-{uuid.uuid4().hex[:8]}"
            old.parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomic(path: Path, data: bytes | str, *, durable: bool = True) -> None:
    """Write one file atomically (temp file in the same folder, fsync, rename).

    ``durable=False`` skips the fsync: readers still see the old or the new file whole, but a power
    loss may lose the write (fine for a status that is rewritten every fraction of a second).
    """
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(raw)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. the disk is full: leave no half-written temp file behind
        tmp.unlink(missing_ok=True)
        raise
