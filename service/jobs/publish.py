"""Publishing a trained adapter: verify the trainer's output, stamp the job id, rename it in.

The trainer writes its finished adapter (atomically) to a staging folder ``<adapter-dir>/.staging/
<job-id>``; the runner checks it (files present, config parses, sha256 matches ``loraserve.json``),
records the job id in ``loraserve.json`` and renames the folder to ``<adapter-dir>/<name>``. The
name therefore only ever holds a complete, verified adapter, and the rename is the single moment
the next ``/generate`` sees it. Without ``overwrite`` the rename refuses to replace a folder that
appeared while the job trained (rename(2) of a folder onto a non-empty folder fails).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

from trainer.publish import fsync_tree, publish_dir, write_atomic

REQUIRED = ("adapter_config.json", "adapter_model.safetensors", "loraserve.json")


class PublishError(Exception):
    """The trainer's output cannot be published; the message says why (it becomes the job's error)."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED)


def read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "loraserve.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def verify(folder: Path) -> dict:
    """Check a trainer output folder; returns its ``loraserve.json``."""
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise PublishError(f"the trainer's output {folder} lacks {', '.join(missing)}")
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise PublishError(f"adapter_config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise PublishError("adapter_config.json does not describe a LoRA adapter")
    meta = read_meta(folder)
    if meta is None:
        raise PublishError("loraserve.json is missing or not a JSON object")
    if "template" not in meta:
        raise PublishError("loraserve.json has no prompt template")
    digest = file_sha256(folder / "adapter_model.safetensors")
    if meta.get("sha256") not in (None, digest):
        raise PublishError("adapter_model.safetensors does not match the sha256 in loraserve.json")
    meta["sha256"] = digest
    return meta


def publish_adapter(staged: Path, final: Path, job_id: str, *, overwrite: bool) -> str:
    """Verify ``staged``, record ``job_id`` and rename it to ``final``; returns the adapter's sha256."""
    meta = verify(staged)
    meta["job"] = job_id
    write_atomic(staged / "loraserve.json", json.dumps(meta, indent=2) + "\n")
    if overwrite:
        publish_dir(staged, final)
        return meta["sha256"]
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
    return meta["sha256"]


def published_by(final: Path, job_id: str) -> bool:
    """True when ``final`` is a complete adapter that ``job_id`` published (the runner died after it)."""
    meta = read_meta(final) if is_complete(final) else None
    return bool(meta) and meta.get("job") == job_id
