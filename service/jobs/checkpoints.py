"""A job's checkpoints, servable: each checkpoint the trainer writes becomes a version of the job's adapter.

The runner sees the trainer's ``checkpoint`` progress line and keeps the checkpoint's LoRA files (config
and weights, not the optimizer state) as ``<adapter-dir>/.versions/<adapter>/<sha256>/``
(``loracore.artifact.add_version``). From then on ``<adapter>@<version id>`` is a model for ``/v1/*`` and an
adapter for ``/generate`` like any kept version, before the job has published the adapter itself. The
fine-tuning API's checkpoint list names it as ``fine_tuned_model_checkpoint``.

Retention (``keep_checkpoints``, default 3): the newest N checkpoints of a job are kept servable, older
ones are removed as new ones arrive. They stay after the job succeeds or fails (as versions of the
adapter: a later job replacing the adapter keeps ``keep_adapter_versions`` earlier versions, checkpoints
included), and go when the job is cancelled or the adapter is deleted. ``0`` exports none.
``<job>/checkpoint_versions.json`` lists ``[{"step", "version", "time"}]``, oldest first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from loracore import artifact
from loracore.atomic import write_atomic
from loracore.template import DEFAULT_TEMPLATE
from service.jobs.files import JobPaths
from service.settings import Settings


def exported(paths: JobPaths) -> list[dict[str, Any]]:
    try:
        data = json.loads(paths.checkpoint_versions.read_text())
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def export(settings: Settings, paths: JobPaths, adapter: str, checkpoint: Path, step: int) -> str | None:
    """Keep ``checkpoint`` servable as ``adapter@<version id>``; returns the id (None: not exported)."""
    keep = settings.keep_checkpoints
    if keep <= 0 or not artifact.servable(checkpoint):
        return None
    record = artifact.Record(
        template=DEFAULT_TEMPLATE.to_dict(),
        base_model=settings.model,
        created=artifact.created_now(),
        job=paths.root.name,
    )
    version = artifact.add_version(settings.adapter_dir, adapter, checkpoint, record)
    entries = [e for e in exported(paths) if e.get("step") != step]
    entries.append({"step": step, "version": version, "time": time.time()})
    entries.sort(key=lambda e: e["step"])
    for old in entries[:-keep]:
        if all(e["version"] != old["version"] for e in entries[-keep:]):
            artifact.remove_version(settings.adapter_dir, adapter, old["version"])
    write_atomic(paths.checkpoint_versions, json.dumps(entries[-keep:]))
    return version


def remove_all(settings: Settings, paths: JobPaths, adapter: str, keep_version: str | None = None) -> None:
    """A cancelled job's checkpoints are no longer servable (``keep_version``: the one published)."""
    for entry in exported(paths):
        if entry["version"] != keep_version:
            artifact.remove_version(settings.adapter_dir, adapter, entry["version"])
    paths.checkpoint_versions.unlink(missing_ok=True)


def servable_checkpoints(settings: Settings, paths: JobPaths, adapter: str) -> dict[int, str]:
    """step -> ``adapter@<version id prefix>`` for the exported checkpoints still on disk."""
    out = {}
    for entry in exported(paths):
        if (artifact.versions_dir(settings.adapter_dir, adapter) / entry["version"]).is_dir():
            out[int(entry["step"])] = f"{adapter}{artifact.VERSION_SEP}{entry['version'][:16]}"
    return out
