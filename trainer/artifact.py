"""The adapter folder: what a LoRA adapter is on disk, its name rule, its record, and how it is published.

    <adapter-dir>/<name>/adapter_config.json        PEFT's LoRA config
                         adapter_model.safetensors  the LoRA weights (PEFT format)
                         loraserve.json             the record: template, base model, sha256, created, job
                         training_summary.json      trained adapters only: the trainer's summary

A folder is built in a staging folder beside its final place (same filesystem), checked with
``verify`` and renamed in by ``publish``, so a name is always absent or a complete, verified adapter.
The trainer writes adapters this way; the service lists, uploads and renames them with the names
defined here. Light on purpose (standard library only): the API process and the engine import it.

    with staged(final) as folder:
        ...write CONFIG_FILE and WEIGHTS_FILE...
        write_record(folder, Record(template=..., base_model=..., created=created_now()))
        publish(folder, final)  # verify, seal the record with the weights' sha256, rename
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trainer.errors import TrainerError
from trainer.publish import publish_dir, write_atomic

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
RECORD_FILE = "loraserve.json"
SUMMARY_FILE = "training_summary.json"
REQUIRED = (CONFIG_FILE, WEIGHTS_FILE, RECORD_FILE)  # what a published adapter always has
RECORD_FORMAT = 1
STAGING = ".staging"  # hidden, so listings skip it; never a valid adapter name

# A name becomes one path segment under the adapter dir: no '/', no leading '.', no '..'.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ArtifactError(TrainerError):
    """A folder that is not a complete adapter; the message says what is wrong."""


# ----------------------------------------------------------------------------- names


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be an adapter name, or None if it can."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):  # fullmatch: "$" would allow "x\n"
        return (
            f"invalid adapter name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    if ".." in name:
        return f"invalid adapter name {name!r}: '..' is not allowed"
    return None


def valid_name(name: Any) -> bool:
    return name_problem(name) is None


# ----------------------------------------------------------------------------- hashing and the record


def file_sha256(*paths: str | Path | None) -> str:
    """sha256 of the files' bytes in order (None is skipped), read in 1 MiB blocks."""
    h = hashlib.sha256()
    for path in paths:
        if path is None:
            continue
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def created_now() -> str:
    """The trainer's ``created`` stamp: UTC to the second, e.g. ``2026-01-02T03:04:05Z``."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Record:
    """``loraserve.json``. Readers tolerate a missing or partial record (a plain PEFT folder)."""

    template: dict | None = None  # trainer.template.PromptTemplate.to_dict(); None: the default template
    base_model: str | None = None
    sha256: str | None = None  # of WEIGHTS_FILE
    created: str | None = None
    job: str | None = None  # the /train job that produced it; None for uploads and CLI runs
    format: int = RECORD_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """Known keys only; a template that is not an object counts as absent."""
        template = data.get("template")
        return cls(
            template=template if isinstance(template, dict) else None,
            base_model=data.get("base_model"),
            sha256=data.get("sha256"),
            created=data.get("created"),
            job=data.get("job"),
            format=data.get("format", RECORD_FORMAT),
        )


def read_record(folder: Path) -> Record | None:
    """The folder's record; None when it has none or it is not a JSON object."""
    try:
        data = json.loads((Path(folder) / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return Record.from_dict(data) if isinstance(data, dict) else None


def write_record(folder: Path, record: Record) -> None:
    write_atomic(Path(folder) / RECORD_FILE, json.dumps(record.to_dict(), indent=2) + "\n")


# ----------------------------------------------------------------------------- checking


def is_complete(folder: Path) -> bool:
    """Every required file is there (cheap: no parsing, no hashing)."""
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED)


def verify(folder: Path) -> Record:
    """Check a folder before it is published: files present, a LoRA config, a record with a template,
    weights matching the record's sha256 (a record without one gets it). Returns the record."""
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise ArtifactError(f"the adapter folder {folder} lacks {', '.join(missing)}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ArtifactError(f"{CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ArtifactError(f"{CONFIG_FILE} does not describe a LoRA adapter")
    record = read_record(folder)
    if record is None:
        raise ArtifactError(f"{RECORD_FILE} is missing or not a JSON object")
    if record.template is None:
        raise ArtifactError(f"{RECORD_FILE} has no prompt template")
    digest = file_sha256(folder / WEIGHTS_FILE)
    if record.sha256 not in (None, digest):
        raise ArtifactError(f"{WEIGHTS_FILE} does not match the sha256 in {RECORD_FILE}")
    record.sha256 = digest
    return record


# ----------------------------------------------------------------------------- publishing


def staging_for(final: Path, label: str | None = None) -> Path:
    """A fresh empty folder on ``final``'s filesystem, where ``final`` is built before ``publish``.

    It lies in ``<parent>/.staging/``, or beside ``final`` when ``final`` is itself a staged folder
    (a /train job's output lives in ``<adapter-dir>/.staging/``): one staging level, never two.
    """
    final = Path(final)
    root = final.parent if final.parent.name == STAGING else final.parent / STAGING
    path = root / f"{label or final.name}-{uuid.uuid4().hex[:12]}"
    path.mkdir(parents=True)
    return path


@contextmanager
def staged(final: Path, label: str | None = None) -> Iterator[Path]:
    """``staging_for(final)``, removed again unless ``publish`` renamed it away inside the block."""
    folder = staging_for(final, label)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(folder: Path, final: Path) -> Record:
    """Verify a staged folder, seal its record with the weights' sha256 (if it has none yet) and rename
    it to ``final``, replacing what was there atomically. Returns the record as published."""
    record = verify(folder)
    if read_record(folder).sha256 is None:  # type: ignore[union-attr]  (verify read it)
        write_record(folder, record)
    publish_dir(folder, final)
    return record
