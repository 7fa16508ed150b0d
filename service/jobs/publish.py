"""Publishing a trained adapter: rename the trainer's verified output to the adapter's name.

The trainer gets ``--output <adapter-dir>/.staging/<job-id>`` and ``--job-id``; it stages the
adapter beside that folder, verifies it and renames it in (``loracore.artifact``), so the folder
only ever holds a complete, verified adapter whose record names this job. The runner stores it as a
version and swaps ``<adapter-dir>/<name>`` to it (``artifact.publish_version``): the single moment the
next ``/generate`` sees it. Without ``overwrite`` the rename refuses to replace a folder that appeared
while the job trained (rename(2) of a folder onto a non-empty folder fails). Only a folder the trainer
did not write for this job (an earlier run's output, say) is verified again and stamped with the job
id first.
"""

from __future__ import annotations

from pathlib import Path

from loracore import artifact


class PublishError(Exception):
    """The trainer's output cannot be published; the message says why (it becomes the job's error)."""


def publish_adapter(staged: Path, final: Path, job_id: str, *, overwrite: bool, keep: int = 0) -> str:
    """Publish the trainer's output ``staged`` as the current version of ``final``; returns its sha256.

    The version is stored once and ``final`` swapped to it (``artifact.publish_version``); the one it
    replaces stays stored (``keep`` earlier versions at most). On a failure (a full disk) nothing
    visible changed: the previous version keeps serving.
    """
    record = artifact.read_record(staged) if artifact.is_complete(staged) else None
    if record is None or record.job != job_id or record.sha256 is None:  # not this job's trainer output
        try:
            record = artifact.verify(staged)
        except artifact.ArtifactError as exc:
            raise PublishError(str(exc)) from None
        record.job = job_id
        artifact.write_record(staged, record)
    try:
        artifact.publish_version(staged, final.parent, final.name, keep, replace=overwrite)
    except artifact.NameTaken:
        raise PublishError(
            f"adapter '{final.name}' was created by someone else while this job trained; "
            "train again with overwrite: true to replace it"
        ) from None
    return record.sha256


def published_by(final: Path, job_id: str) -> bool:
    """True when ``final`` is a complete adapter that ``job_id`` published (the runner died after it)."""
    record = artifact.read_record(final) if artifact.is_complete(final) else None
    return record is not None and record.job == job_id
