"""The adapter folder: what a LoRA adapter is on disk, its name rule, its record, and how it is published.

    <adapter-dir>/<name>/adapter_config.json        PEFT's LoRA config
                         adapter_model.safetensors  the LoRA weights (PEFT format)
                         loraserve.json             the record: template, base model, sha256, created, job
                         training_summary.json      trained adapters only: the trainer's summary

A folder is built in a staging folder beside its final place (same filesystem), checked with
``verify`` and renamed in by ``publish``, so a name is always absent or a complete, verified adapter.

Versions: an adapter's version id is the sha256 of its weights file. ``name@<hex>`` (8 to 64 hex
digits, a prefix of the id) refers to one version, ``name`` to the newest (the folder itself).
Earlier versions are kept as copies in ``<adapter-dir>/.versions/<name>/<sha256>/`` (hidden, so
listings and the name rule never see them; never modified once renamed in), see ``keep_version``.
The trainer writes adapters this way; the service lists, uploads and renames them with the names
defined here. Light on purpose (standard library only): the API process and the engine import it.

    with staged(final) as folder:
        ...write CONFIG_FILE and WEIGHTS_FILE...
        write_record(folder, Record(template=..., base_model=..., created=created_now()))
        publish(folder, final)  # verify, seal the record with the weights' sha256, rename
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loracore.atomic import fsync_tree, publish_dir, write_atomic

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
RECORD_FILE = "loraserve.json"
SUMMARY_FILE = "training_summary.json"
REQUIRED = (CONFIG_FILE, WEIGHTS_FILE, RECORD_FILE)  # what a published adapter always has
RECORD_FORMAT = 1
STAGING = ".staging"  # hidden, so listings skip it; never a valid adapter name
VERSIONS = ".versions"  # kept versions: <adapter-dir>/.versions/<name>/<sha256>/
VERSION_SEP = "@"
MIN_VERSION_PREFIX = 8
_VERSION_RE = re.compile(rf"^[0-9a-f]{{{MIN_VERSION_PREFIX},64}}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# A name becomes one path segment under the adapter dir: no '/', no leading '.', no '..'.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ArtifactError(ValueError):
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


def split_ref(ref: str) -> tuple[str, str | None]:
    """``"name@AbC123.."`` -> ``("name", "abc123..")``; ``"name"`` -> ``("name", None)``."""
    name, sep, version = ref.partition(VERSION_SEP)
    return name, (version.lower() if sep else None)


def ref_problem(ref: Any) -> str | None:
    """Why ``ref`` (``name`` or ``name@<version id prefix>``) cannot name an adapter, or None."""
    if not isinstance(ref, str):
        return name_problem(ref)
    name, version = split_ref(ref)
    problem = name_problem(name)
    if problem is not None or version is None:
        return problem
    if not _VERSION_RE.fullmatch(version):
        return (
            f"invalid adapter version {version!r} in {ref!r}: after '{VERSION_SEP}' give at least "
            f"{MIN_VERSION_PREFIX} (at most 64) hex digits of the version id (its weights' sha256)"
        )
    return None


def valid_ref(ref: Any) -> bool:
    return ref_problem(ref) is None


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


# weights file -> (its stat identity, sha256): a version is hashed once, not per request. ctime is
# part of the identity, so even a same-size, mtime-preserving rewrite in place is hashed again.
_digests: dict[Path, tuple[tuple[int, ...], str]] = {}


def weights_digest(folder: Path) -> str | None:
    """sha256 of the folder's weights file (the version id); None when it has none."""
    path = Path(folder) / WEIGHTS_FILE
    try:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        hit = _digests.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        digest = file_sha256(path)
    except OSError:
        return None
    if len(_digests) > 4096:  # stale entries of replaced folders
        _digests.clear()
    _digests[path] = (key, digest)
    return digest


def created_now() -> str:
    """The trainer's ``created`` stamp: UTC to the second, e.g. ``2026-01-02T03:04:05Z``."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Record:
    """``loraserve.json``. Readers tolerate a missing or partial record (a plain PEFT folder)."""

    template: dict | None = None  # loracore.template.PromptTemplate.to_dict(); None: the default template
    base_model: str | None = None
    sha256: str | None = None  # of WEIGHTS_FILE
    created: str | None = None
    job: str | None = None  # the /train job that produced it; None for uploads and CLI runs
    # the base it was trained on: loracore.families.base_shape (model_type, hidden_size, num_layers)
    # plus its name; None for folders written before it was recorded and for uploads
    base: dict | None = None
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
            base=data.get("base") if isinstance(data.get("base"), dict) else None,
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


def servable(folder: Path) -> bool:
    """Config and weights are there: what serving needs (a plain PEFT folder has no record)."""
    return (Path(folder) / CONFIG_FILE).is_file() and (Path(folder) / WEIGHTS_FILE).is_file()


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


# ----------------------------------------------------------------------------- versions


@dataclass(frozen=True)
class Version:
    """One servable version of an adapter: its id (weights sha256) and the folder holding it."""

    id: str
    folder: Path
    current: bool  # the adapter's own folder (the newest), not a kept copy


def versions_dir(adapter_dir: Path, name: str) -> Path:
    return Path(adapter_dir) / VERSIONS / name


def _kept(adapter_dir: Path, name: str) -> list[tuple[int, Path]]:
    """(mtime_ns, folder) of the kept copies, newest first: a copy is touched when it stops being current."""
    root = versions_dir(adapter_dir, name)
    out = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not _SHA256_RE.fullmatch(entry.name):
            continue
        try:
            out.append((entry.stat().st_mtime_ns, entry))
        except OSError:  # expired while we looked
            continue
    out.sort(key=lambda item: (-item[0], item[1].name))
    return out


def versions(adapter_dir: Path, name: str) -> list[Version]:
    """Every version of ``name`` that can be served, newest first: the current folder, then kept copies."""
    out = []
    current = Path(adapter_dir) / name
    current_id = weights_digest(current) if servable(current) else None
    if current_id is not None:
        out.append(Version(current_id, current, True))
    out.extend(
        Version(folder.name, folder, False)
        for _, folder in _kept(adapter_dir, name)
        if folder.name != current_id and servable(folder)
    )
    return out


def resolve(adapter_dir: Path, ref: str) -> Version | None:
    """The version ``ref`` names (the newest whose id starts with its prefix), or None. ``ref`` must be
    valid (``valid_ref``)."""
    name, prefix = split_ref(ref)
    current = Path(adapter_dir) / name
    if prefix is None:
        current_id = weights_digest(current) if servable(current) else None
        return Version(current_id, current, True) if current_id is not None else None
    return next((v for v in versions(adapter_dir, name) if v.id.startswith(prefix)), None)


def missing_message(adapter_dir: Path, ref: str) -> str:
    """Why ``ref`` is not servable, naming the version and the ones that are kept."""
    name, prefix = split_ref(ref)
    if prefix is None or not servable(Path(adapter_dir) / name):
        return f"adapter {name!r} does not exist"
    kept = ", ".join(v.id[: MIN_VERSION_PREFIX * 2] for v in versions(adapter_dir, name))
    return (
        f"adapter {name!r} has no version {prefix!r} (unknown, or expired: older versions than the kept "
        f"ones are removed); its versions, newest first: {kept}"
    )


def keep_version(adapter_dir: Path, name: str, keep: int, *, replacing: bool) -> None:
    """Keep a copy of the current folder of ``name`` as ``.versions/<name>/<sha256>`` and drop the kept
    versions beyond the ``keep`` newest earlier ones.

    Called before a publish replaces the folder (``replacing``: so requests pinned to the old version
    still find it; the copy then counts as an earlier version) and when a folder dropped in by hand
    is first seen. The copy is staged and renamed in, so a kept
    version is complete or absent; copies (not hard links) because a hand-edited folder may be
    rewritten in place. Its mtime orders the kept versions: it is touched when it stops being current.
    """
    adapter_dir = Path(adapter_dir)
    current = adapter_dir / name
    current_id = weights_digest(current) if servable(current) else None
    if keep > 0 and current_id is not None:
        dest = versions_dir(adapter_dir, name) / current_id
        try:
            os.utime(dest)  # kept already: now the newest earlier version
        except FileNotFoundError:
            _copy_in(current, dest, current_id, adapter_dir)
    expire(adapter_dir, name, keep, None if replacing else current_id)


def _copy_in(source: Path, dest: Path, version_id: str, adapter_dir: Path) -> None:
    tmp = adapter_dir / STAGING / f"keep-{source.name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        for entry in source.iterdir():
            if entry.is_file():
                shutil.copy2(entry, tmp / entry.name)
        if file_sha256(tmp / WEIGHTS_FILE) != version_id:  # replaced while we copied: keep nothing
            return
        fsync_tree(tmp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, dest)
        except OSError as exc:  # another process kept the same version first: same bytes
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    except FileNotFoundError:  # the folder went away while we copied
        return
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_version(adapter_dir: Path, name: str, source: Path, record: Record) -> str:
    """Keep the LoRA files of ``source`` (config and weights, e.g. a training checkpoint's, which holds
    optimizer state too) as a version of ``name``, servable as ``name@<id>``; returns the version id.

    The copy is staged, sealed with the weights' sha256 and renamed in, so it is complete or absent; a
    version already kept (same weights) is left as it is.
    """
    adapter_dir = Path(adapter_dir)
    tmp = adapter_dir / STAGING / f"version-{name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(Path(source) / file, tmp / file)
        digest = file_sha256(tmp / WEIGHTS_FILE)
        record.sha256 = digest
        write_record(tmp, record)
        dest = versions_dir(adapter_dir, name) / digest
        if not dest.is_dir():
            fsync_tree(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, dest)
            except OSError as exc:  # kept by another process meanwhile: the same bytes
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        return digest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_version(adapter_dir: Path, name: str, version_id: str) -> None:
    """Remove one kept version of ``name`` (never the current folder)."""
    if _SHA256_RE.fullmatch(version_id):
        _remove(Path(adapter_dir), versions_dir(adapter_dir, name) / version_id)


def expire(adapter_dir: Path, name: str, keep: int, current_id: str | None) -> None:
    """Remove the kept versions of ``name`` beyond the ``keep`` newest ones other than the current."""
    earlier = [folder for _, folder in _kept(adapter_dir, name) if folder.name != current_id]
    for folder in earlier[max(keep, 0) :]:
        _remove(Path(adapter_dir), folder)


def remove_versions(adapter_dir: Path, name: str) -> None:
    """Remove every kept version of ``name`` (the adapter is being deleted)."""
    _remove(Path(adapter_dir), versions_dir(adapter_dir, name))


def _remove(adapter_dir: Path, folder: Path) -> None:
    """One rename takes the folder away (readers see it whole or not at all), then its files go."""
    trash = adapter_dir / STAGING / f"expired-{folder.name}-{uuid.uuid4().hex[:12]}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)
