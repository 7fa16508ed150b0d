"""Publishing a trained adapter: rename the trainer's verified output to the adapter's name.

The trainer gets ``--output <adapter-dir>/.staging/<job-id>`` and ``--job-id``; it stages the
adapter beside that folder, verifies it and renames it in (``loracore.artifact``), so the folder
only ever holds a complete, verified adapter whose record names this job. The runner renames it
to ``<adapter-dir>/<name>``: the single moment the next ``/generate`` sees it. Without
``overwrite`` the rename refuses to replace a folder that appeared while the job trained (rename(2)
of a folder onto a non-empty folder fails). Only a folder the trainer did not write for this job
(an earlier run's output, say) is verified again and stamped with the job id first.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from loracore import artifact
from loracore.atomic import fsync_tree, publish_dir


class PublishError(Exception):
    """The trainer's output cannot be published; the message says why (it becomes the job's error)."""


def publish_adapter(staged: Path, final: Path, job_id: str, *, overwrite: bool, keep: int = 0) -> str:
    """Rename the trainer's output ``staged`` to ``final``; returns the adapter's sha256.

    A version it replaces is kept first (``keep`` earlier versions at most, ``artifact.keep_version``).
    """
    record = artifact.read_record(staged) if artifact.is_complete(staged) else None
    if record is None or record.job != job_id or record.sha256 is None:  # not this job's trainer output
        try:
            record = artifact.verify(staged)
        except artifact.ArtifactError as exc:
            raise PublishError(str(exc)) from None
        record.job = job_id
        artifact.write_record(staged, record)
    if overwrite:
        artifact.keep_version(final.parent, final.name, keep, replacing=True)
        publish_dir(staged, final)
        return record.sha256
    fsync_tree(staged)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staged, final)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise PublishError(
                f"adapter '{final.name}' was created by someone else while this job trained; "
                "train again with overwrite: true to replace it"
            ) from None
        raise
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return record.sha256


def published_by(final: Path, job_id: str) -> bool:
    """True when ``final`` is a complete adapter that ``job_id`` published (the runner died after it)."""
    record = artifact.read_record(final) if artifact.is_complete(final) else None
    return record is not None and record.job == job_id
