"""The adapter folder: what a LoRA adapter is on disk, its name rule, its record, and how it is published.

    <adapter-dir>/<name>/adapter_config.json        PEFT's LoRA config
                         adapter_model.safetensors  the LoRA weights (PEFT format)
                         loraserve.json             the record: template, base model, sha256, created, job
                         training_summary.json      trained adapters only: the trainer's summary

A folder is built in a staging folder beside its final place (same filesystem), checked with
``verify`` and renamed in by ``publish``, so a name is always absent or a complete, verified adapter.

Versions: an adapter's version id is the sha256 of its weights file. ``name@<hex>`` (8 to 64 hex
digits, a prefix of the id) refers to one version, ``name`` to the newest (the folder itself).
Every published version is stored once, at publish, in ``<adapter-dir>/.versions/<name>/<sha256>/``
(hidden, so listings and the name rule never see it; never modified once renamed in, its files
read-only), and ``<adapter-dir>/<name>/`` is a folder of hard links to the current version's files,
swapped atomically (``publish_version``): kept versions cost no second copy of the weights. A folder
dropped in by hand is servable at once and is stored the same way by the adapter watcher (``adopt``).
Resolving a name or a version only reads.
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
from contextlib import contextmanager, suppress
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


class NameTaken(ArtifactError):
    """A publish that must not replace found the name taken."""


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
    current: bool  # the adapter's own folder (the newest), not a kept version


def versions_dir(adapter_dir: Path, name: str) -> Path:
    return Path(adapter_dir) / VERSIONS / name


def _stored(adapter_dir: Path, name: str) -> list[tuple[int, Path]]:
    """(mtime_ns, folder) of the stored versions, newest first: a version is touched when it stops
    being current."""
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


def current_id(adapter_dir: Path, name: str) -> str | None:
    """The version id of ``<adapter-dir>/<name>/`` now (hashed once per change of its weights file)."""
    current = Path(adapter_dir) / name
    return weights_digest(current) if servable(current) else None


def versions(adapter_dir: Path, name: str) -> list[Version]:
    """Every version of ``name`` that can be served, newest first: the current folder, then the kept
    ones whose weights still hash to their id (a folder adopted by hard links shares its files with
    the folder it came from, so an in-place rewrite there changes the kept version too: it is dropped)."""
    out = []
    current = Path(adapter_dir) / name
    cid = current_id(adapter_dir, name)
    if cid is not None:
        out.append(Version(cid, current, True))
    out.extend(
        Version(folder.name, folder, False)
        for _, folder in _stored(adapter_dir, name)
        if folder.name != cid and servable(folder) and weights_digest(folder) == folder.name
    )
    return out


def resolve(adapter_dir: Path, ref: str) -> Version | None:
    """The version ``ref`` names (the newest whose id starts with its prefix), or None. ``ref`` must be
    valid (``valid_ref``). A read: nothing on disk changes."""
    name, prefix = split_ref(ref)
    if prefix is None:
        cid = current_id(adapter_dir, name)
        return Version(cid, Path(adapter_dir) / name, True) if cid is not None else None
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


def publish_version(folder: Path, adapter_dir: Path, name: str, keep: int, *, replace: bool = True) -> Record:
    """Publish a staged folder as the current version of ``name``; returns its record.

    1. ``verify`` it and seal its record with the weights' sha256 (the version id);
    2. store it as ``.versions/<name>/<id>/`` (written once, by hard links to the staged files, which
       are made read-only; if that version is stored already, the stored one is used);
    3. build the name's folder from hard links to the version's files (no second copy) and swap it in
       for ``<adapter-dir>/<name>/`` atomically (``replace``), or rename it in where the name is free
       (else ``NameTaken``). The version it replaces is touched, so it orders as the newest earlier one;
    4. remove the staged folder and drop the earlier versions beyond the ``keep`` newest.

    On any failure (a full disk, say) nothing visible changed: the name still serves what it served,
    a version stored by this call is removed again, and the staged folder is still there (a job's
    runner that dies midway publishes it again on restart).
    """
    adapter_dir = Path(adapter_dir)
    record = verify(folder)
    if read_record(folder).sha256 is None:  # type: ignore[union-attr]  (verify read it)
        write_record(folder, record)
    vid = record.sha256
    assert vid is not None
    final = adapter_dir / name
    stored = versions_dir(adapter_dir, name) / vid
    created = False
    if not (stored.is_dir() and weights_digest(stored) == vid):
        if stored.exists():  # damaged on disk: replaced by these bytes
            _remove(adapter_dir, stored)
        for entry in folder.iterdir():
            if entry.is_file():
                entry.chmod(0o444)
        created = _store(folder, stored, final)
    try:
        link = staging_for(final, f"link-{name}")
        try:
            _link_files(stored, link)
            previous = current_id(adapter_dir, name)
            if previous is not None and previous != vid:
                # (a folder placed by hand and not adopted yet is not stored: nothing to touch)
                with suppress(FileNotFoundError):
                    os.utime(versions_dir(adapter_dir, name) / previous)
            if replace:
                publish_dir(link, final)
            else:
                _rename_new(link, final)
        finally:
            shutil.rmtree(link, ignore_errors=True)
    except BaseException:
        if created:
            _remove(adapter_dir, stored)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    expire(adapter_dir, name, keep, vid)
    return record


def _store(source: Path, dest: Path, beside: Path) -> bool:
    """Link ``source``'s files into a staged folder and rename it to ``dest``; False when another
    writer stored the same version first (same bytes)."""
    tmp = staging_for(beside, f"version-{beside.name}")
    try:
        _link_files(source, tmp)
        fsync_tree(tmp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, dest)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            return False
        return True
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


def _rename_new(folder: Path, final: Path) -> None:
    fsync_tree(folder)
    try:
        os.rename(folder, final)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise NameTaken(f"adapter '{final.name}' exists already") from None
        raise
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _link_files(source: Path, dest: Path) -> None:
    """Hard-link every file of ``source`` into ``dest``, all from one opening of ``source`` (a swap of
    it meanwhile cannot mix two versions); where the filesystem refuses links, copy."""
    dfd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for entry in os.scandir(dfd):
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                os.link(entry.name, dest / entry.name, src_dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                    raise
                src = os.open(entry.name, os.O_RDONLY, dir_fd=dfd)
                with os.fdopen(src, "rb") as fin, open(dest / entry.name, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
    finally:
        os.close(dfd)


def adopt(adapter_dir: Path, name: str, keep: int) -> str | None:
    """Store the current folder of ``name`` as a version when it is not one yet (a folder dropped in
    or replaced by hand), so it stays servable as ``name@<id>`` after the next replace, and drop the
    earlier versions beyond ``keep``. Its files are hard-linked (one copy where links are impossible).
    Returns the id of a version stored now, else None. Called by the adapter watcher, never on the
    request path."""
    adapter_dir = Path(adapter_dir)
    cid = current_id(adapter_dir, name)
    if cid is None:
        return None
    dest = versions_dir(adapter_dir, name) / cid
    if dest.is_dir():
        return None
    current = adapter_dir / name
    try:
        if not _store(current, dest, current):
            return None
    except FileNotFoundError:  # the folder went away meanwhile
        return None
    if file_sha256(dest / WEIGHTS_FILE) != cid:  # replaced meanwhile: the next scan adopts the new one
        _remove(adapter_dir, dest)
        return None
    expire(adapter_dir, name, keep, cid)
    return cid


def expire(adapter_dir: Path, name: str, keep: int, current: str | None) -> None:
    """Remove the stored versions of ``name`` beyond the ``keep`` newest ones other than ``current``."""
    earlier = [folder for _, folder in _stored(adapter_dir, name) if folder.name != current]
    for folder in earlier[max(keep, 0) :]:
        _remove(Path(adapter_dir), folder)


def remove_versions(adapter_dir: Path, name: str) -> None:
    """Remove every stored version of ``name`` (the adapter is being deleted)."""
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
