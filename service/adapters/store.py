"""The disk side of adapters: the adapter directory is the source of truth.

``<adapter-dir>/<name>/`` holds an adapter folder (its files, record and name rule: ``loracore.artifact``).
A folder that appears there is servable on its next request: nothing here caches the listing.
Versions live in ``<adapter-dir>/.versions/<name>/<sha256>/`` (``loracore.artifact``): written once at
publish, the name's folder hard links to the current one, up to ``keep`` earlier versions per adapter.
Resolving a request's adapter only reads.
Uploads are validated without torch and without pickle (the safetensors header is parsed by hand),
staged and renamed in atomically by ``loracore.artifact``, so a name is always absent or a complete
adapter.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loracore import artifact, lora_format
from loracore.artifact import CONFIG_FILE, STAGING, WEIGHTS_FILE
from loracore.lora_format import BaseLayout
from loracore.template import DEFAULT_TEMPLATE, PromptTemplate, Template, choose_template
from service.errors import ApiError
from service.schemas import AdapterInfo, AdapterVersion
from service.text_input import check_text
from service.wire import ResolvedTarget

MAX_CONFIG_BYTES = 1024 * 1024
_SAFETENSORS_DTYPES = {"F16": 2, "BF16": 2, "F32": 4}
# --- names and lookups ---------------------------------------------------------------------------


def check_name(name: str, param: str = "name") -> None:
    problem = artifact.name_problem(name)
    if problem:
        raise ApiError(422, "invalid_adapter_name", problem, param)


def check_ref(ref: str, param: str = "adapter") -> None:
    """422 for a request's adapter that is neither ``name`` nor ``name@<8+ hex digits>``."""
    problem = artifact.ref_problem(ref)
    if problem:
        code = "invalid_adapter_version" if artifact.valid_name(artifact.split_ref(ref)[0]) else None
        raise ApiError(422, code or "invalid_adapter_name", problem, param)


def resolve(adapter_dir: Path, ref: str, param: str = "adapter") -> artifact.Version:
    """The version a request's ``adapter`` names: 422 for a malformed one, 404 naming it when absent.
    A read: the request path never writes to the adapter directory (a folder dropped in by hand is
    stored as a version by the watcher, ``service.adapters.watcher``; an adapter fetched from
    ``--adapter-source`` is published before this, by ``service.adapters.source``)."""
    check_ref(ref, param)
    version = artifact.resolve(adapter_dir, ref)
    if version is None:
        raise ApiError(404, "adapter_not_found", artifact.missing_message(adapter_dir, ref), param)
    return version


def resolve_target(adapter_dir: Path, ref: str, param: str = "adapter") -> ResolvedTarget:
    """The version ``ref`` names and the prompt template recorded WITH it, resolved once for a request:
    the route renders with ``template`` and the worker loads exactly ``version_id`` (``target.ref``), so a
    publish in between cannot pair one version's template with another's weights. 422/404 as ``resolve``.
    """
    for _ in range(3):
        version = resolve(adapter_dir, ref, param)
        record = artifact.read_record(version.folder) or artifact.Record()
        # The record is this version's when it is sealed with its sha256, or when the weights are still
        # the ones resolved after it was read (a plain folder has no sha256 in a record).
        if record.sha256 == version.id or (
            record.sha256 is None and artifact.weights_digest(version.folder) == version.id
        ):
            template = choose_template(None, record.template)
            return ResolvedTarget(artifact.split_ref(ref)[0], version.id, template)
        ref = f"{artifact.split_ref(ref)[0]}{artifact.VERSION_SEP}{version.id}"  # replaced meanwhile: pin
    raise ApiError(404, "adapter_not_found", artifact.missing_message(adapter_dir, ref), param)


def adapter_path(adapter_dir: Path, name: str) -> Path:
    """The folder of ``name``; the name must already be valid (it cannot contain '/' or '..')."""
    return Path(adapter_dir) / name


def adapter_not_found(name: str) -> ApiError:
    """404 for the adapter a path's ``name`` names that does not exist."""
    return ApiError(404, "adapter_not_found", f"adapter {name!r} does not exist", "name")


def exists(adapter_dir: Path, name: str) -> bool:
    return artifact.servable(adapter_path(adapter_dir, name))


def names(adapter_dir: Path) -> list[str]:
    """Every servable adapter name, sorted. Hidden folders (``.staging``) and invalid names are skipped."""
    root = Path(adapter_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        if entry.name.startswith(".") or not artifact.valid_name(entry.name) or not entry.is_dir():
            continue
        if exists(root, entry.name):
            found.append(entry.name)
    return sorted(found)


def read_record(adapter_dir: Path, name: str) -> artifact.Record:
    """The record of an adapter; an empty one when the folder is a plain PEFT folder."""
    return artifact.read_record(adapter_path(adapter_dir, name)) or artifact.Record()


def info(
    adapter_dir: Path,
    name: str,
    loaded: set[str] | frozenset[str] = frozenset(),
    base_template: Template | None = None,
    pinned: frozenset[str] = frozenset(),
) -> AdapterInfo:
    check_name(name)
    folder = adapter_path(adapter_dir, name)
    if not exists(adapter_dir, name):
        raise adapter_not_found(name)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    except (OSError, ValueError) as exc:  # deleted or replaced while we read it
        raise ApiError(404, "adapter_not_found", f"adapter {name!r} is not readable: {exc}", "name") from exc
    record = read_record(adapter_dir, name)
    created = _created(record, folder)
    template = choose_template(base_template, record.template).to_dict()  # the one chat renders with
    kept = [i for v in artifact.versions(adapter_dir, name) if (i := _version_info(v)) is not None]
    return AdapterInfo(
        name=name,
        rank=int(config.get("r", 0)),
        alpha=float(config.get("lora_alpha", 0)),
        target_modules=config.get("target_modules") or [],
        size_bytes=size,
        created=created,
        sha256=kept[0].id if kept and kept[0].current else record.sha256,
        base_model=record.base_model or config.get("base_model_name_or_path"),
        loaded=name in loaded,
        pinned=name in pinned,
        template=template,
        versions=kept,
    )


def _created(record: artifact.Record, folder: Path) -> str:
    return record.created or datetime.fromtimestamp(folder.stat().st_mtime, UTC).isoformat()


def _version_info(version: artifact.Version) -> AdapterVersion | None:
    try:
        size = sum(p.stat().st_size for p in version.folder.iterdir() if p.is_file())
        created = _created(artifact.read_record(version.folder) or artifact.Record(), version.folder)
    except OSError:  # expired while we read it
        return None
    return AdapterVersion(id=version.id, created=created, size_bytes=size, current=version.current)


def list_infos(
    adapter_dir: Path,
    loaded: set[str] | frozenset[str] = frozenset(),
    base_template: Template | None = None,
    pinned: frozenset[str] = frozenset(),
) -> list[AdapterInfo]:
    out = []
    for name in names(adapter_dir):
        try:
            out.append(info(adapter_dir, name, loaded, base_template, pinned))
        except ApiError:  # vanished between listing and reading
            continue
    return out


# --- upload validation -----------------------------------------------------------------------------


def _bad(message: str, param: str) -> ApiError:
    return ApiError(422, "invalid_adapter", message, param)


def parse_safetensors_header(raw: bytes) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape, data_offsets}, after checking the file is well formed.

    The format is an 8-byte little-endian header length, a JSON header, then the tensor bytes;
    every tensor's byte range must lie inside the data and match its dtype and shape.
    """
    param = "adapter_model"
    if len(raw) < 8:
        raise _bad("adapter_model is not a safetensors file (shorter than its 8-byte header length)", param)
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > min(len(raw) - 8, 100 * 1024 * 1024):
        raise _bad(
            f"adapter_model is not a safetensors file (header length {header_len} exceeds the file)", param
        )
    try:
        header = json.loads(raw[8 : 8 + header_len])
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"adapter_model has an unreadable safetensors header: {exc}", param) from exc
    if not isinstance(header, dict):
        raise _bad("adapter_model's safetensors header is not a JSON object", param)
    header.pop("__metadata__", None)
    data_len = len(raw) - 8 - header_len
    tensors: dict[str, dict[str, Any]] = {}
    for key, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise _bad(f"adapter_model: tensor {key!r} has a malformed header entry", param)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise _bad(
                f"adapter_model: tensor {key!r} has dtype {dtype}; expected one of F16, BF16, F32", param
            )
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise _bad(f"adapter_model: tensor {key!r} has an invalid shape {shape!r}", param)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _bad(f"adapter_model: tensor {key!r} has invalid data offsets", param)
        start, end = offsets
        count = 1
        for d in shape:
            count *= d
        if not 0 <= start <= end <= data_len or end - start != count * _SAFETENSORS_DTYPES[dtype]:
            raise _bad(f"adapter_model: tensor {key!r} does not fit the file (truncated or corrupt)", param)
        tensors[key] = entry
    if not tensors:
        raise _bad("adapter_model holds no tensors", param)
    return tensors


def validate_upload(config_raw: bytes, weights_raw: bytes, layout: BaseLayout) -> dict[str, Any]:
    """Check an uploaded adapter against the base; returns the parsed adapter_config.json.

    The rules are the engine's (``loracore.lora_format``): a folder passes exactly when the engine can
    serve it. Here the config's size and JSON, the safetensors file's form (without torch or pickle)
    and finite values are checked too, because the bytes are read here without loading them.
    """
    if not layout.shapes:
        raise ApiError(
            500, "unsupported_base", f"LoRA uploads on a {layout.model_type!r} base are not supported"
        )
    if len(config_raw) > MAX_CONFIG_BYTES:
        raise _bad("adapter_config is larger than 1 MiB", "adapter_config")
    try:
        config = json.loads(config_raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"adapter_config is not valid JSON: {exc}", "adapter_config") from exc
    try:
        lora_format.check_config(config, layout)
        tensors = parse_safetensors_header(weights_raw)
        lora_format.check_tensors(config, {k: tuple(e["shape"]) for k, e in tensors.items()}, layout)
    except lora_format.LoraFormatError as exc:
        raise _bad(f"{exc.part}: {exc}", exc.part) from exc
    _check_finite(weights_raw, tensors)
    return config


# exponent bits all ones = inf or NaN; read as unsigned integers, so no float conversion (and no torch)
_NONFINITE = {"F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


def _check_finite(raw: bytes, tensors: dict[str, dict[str, Any]]) -> None:
    """422 for a tensor holding NaN or inf: the worker would refuse to load it, failing every request."""
    import numpy as np

    (header_len,) = struct.unpack("<Q", raw[:8])
    data = memoryview(raw)[8 + header_len :]
    for key, entry in tensors.items():
        kind, mask = _NONFINITE[entry["dtype"]]
        start, end = entry["data_offsets"]
        bits = np.frombuffer(data[start:end], dtype=kind)
        if np.any((bits & mask) == mask):
            raise _bad(f"adapter_model: {key!r} holds NaN or infinite values", "adapter_model")


def parse_template(raw: str | None) -> PromptTemplate:
    if raw is None or raw == "":
        return DEFAULT_TEMPLATE
    try:
        data = json.loads(raw)
        check_text(data, "template")
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        not_text = sorted(
            k for k, v in data.items() if k in PromptTemplate.__dataclass_fields__ and not isinstance(v, str)
        )
        if not_text:  # {"user": 5} would fail in str.format with an AttributeError (a 500)
            raise ValueError(f"{', '.join(not_text)} must be text")
        template = PromptTemplate.from_dict(data)
        template.render_prompt("x")
        template.render_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ApiError(
            422, "invalid_template", f"template is not a valid prompt template: {exc}", "template"
        ) from exc
    return template


# --- writes ----------------------------------------------------------------------------------------


def publish(
    adapter_dir: Path,
    name: str,
    config_raw: bytes,
    weights_raw: bytes,
    template: PromptTemplate,
    base_model: str,
    keep: int = 0,
    *,
    replace: bool = True,
) -> bool:
    """Write a validated adapter to staging and publish it as the current version; True if the name
    was new.

    The version it replaces stays stored (``keep`` earlier versions at most), so requests pinned to
    it keep working (``artifact.publish_version``). With ``replace`` False a name that exists meanwhile
    is left as it is (``artifact.NameTaken``)."""
    final = adapter_path(Path(adapter_dir), name)
    try:
        with artifact.staged(final, f"upload-{name}") as staging:
            (staging / CONFIG_FILE).write_bytes(config_raw)
            (staging / WEIGHTS_FILE).write_bytes(weights_raw)
            # created: to the microsecond with "+00:00", as uploads always had (the trainer writes "...Z")
            record = artifact.Record(
                template=template.to_dict(), base_model=base_model, created=datetime.now(UTC).isoformat()
            )
            artifact.write_record(staging, record)
            created = not final.exists()
            artifact.publish_version(staging, Path(adapter_dir), name, keep, replace=replace)
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApiError(
                507,
                "insufficient_storage",
                f"no space left in the adapter directory to store {name!r} ({len(weights_raw)} bytes of "
                "weights); the previous version, if any, is unchanged",
                "adapter_model",
            ) from exc
        raise
    return created


def delete(adapter_dir: Path, name: str) -> None:
    """Remove an adapter and its kept versions: one rename takes the name away, then the files go.

    A worker that already loaded the adapter keeps its copy in memory, so requests already
    running finish; new requests get 404 because the folder is gone.
    """
    check_name(name)
    adapter_dir = Path(adapter_dir)
    folder = adapter_path(adapter_dir, name)
    if not folder.is_dir():
        raise adapter_not_found(name)
    trash = adapter_dir / STAGING / f"deleted-{name}-{uuid.uuid4().hex[:12]}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(folder, trash)
    except FileNotFoundError as exc:  # a concurrent delete won
        raise adapter_not_found(name) from exc
    artifact.remove_versions(adapter_dir, name)
    shutil.rmtree(trash, ignore_errors=True)
