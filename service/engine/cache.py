"""The generation worker's LRU of loaded adapters, kept in step with the adapter directory.

The directory is the source of truth. Entries are keyed by adapter name and version id (the sha256
of the weights, ``loracore.artifact``): every lookup resolves ``name`` to the version in
``<adapter_dir>/<name>/`` now (hashed again whenever the weights file's stat changes, ctime
included) and ``name@<id prefix>`` to that version, current or kept in ``.versions``. So a replaced
folder is reloaded on the next request, even when the new file has the same size and mtime, and a
deleted one is not found. Earlier versions stay cached (least recently used go first) for requests
pinned to them.
An entry is *held* while rows of the running batch use it: held entries are never evicted, and
an evicted version stays alive (held by its rows) until those rows finish, so running rows keep
the weights they started with. At most ``capacity`` entries are cached; when all are held or pinned,
``can_acquire`` says no and the scheduler keeps the request waiting.
An adapter name can be *pinned* (``set_pins``; the worker reads the names from
``service.adapters.pins``): ``sync_pins`` loads the current version of each pinned name as soon as
there is room, and that entry is never evicted. Earlier versions of a pinned name are not pinned.

The cache counts its hits, misses, evictions and load times in ``CacheActivity``; the engine hands
it to its caller with each step (``StepReport.adapters``), and the worker exports it as metrics.
Used from the engine's single thread only (no locks).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracore.artifact import Version, resolve, split_ref, valid_name, valid_ref

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedAdapter:
    name: str
    version: str  # the version id: sha256 of the weights as loaded
    weights: Any  # engine.lora.LoraWeights
    loaded_at: float
    load_seconds: float
    refs: int = 0  # running rows using this version (held while > 0)
    cached: bool = True  # False once evicted (kept alive only by its rows)
    meta: dict = field(default_factory=dict)


@dataclass
class CacheActivity:
    """What the cache did since the last ``take_activity``, and how many entries it holds now."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds: list[float] = field(default_factory=list)  # one per cold load
    loaded: int = 0


class AdapterError(RuntimeError):
    """An adapter folder exists but cannot be loaded; the message names the adapter and the reason.

    ``code`` is the error code the request fails with: ``invalid_adapter`` when the fault is the
    adapter's (its files do not parse, do not fit the base, hold non-finite values, ask for what the
    engine cannot do, or cannot be read as files), ``generation_failed`` when it is the server's (out of
    memory, a disk error, a bug)."""

    def __init__(self, message: str, code: str = "invalid_adapter"):
        super().__init__(message)
        self.code = code


# Faults of the adapter's own files: a format error is a ValueError (``lora.AdapterFormatError``), and
# a folder whose files are directories or unreadable to the server is the folder's fault too.
_ADAPTER_FAULTS = (ValueError, PermissionError, IsADirectoryError, NotADirectoryError)


class AdapterCache:
    def __init__(self, adapter_dir: str | Path, load: Callable[[Path], tuple[Any, str]], capacity: int):
        """``load(folder) -> (weights, sha256 of the weights file as read)`` raises on a bad adapter."""
        if capacity < 1:
            raise ValueError("max_loaded_adapters must be >= 1")
        self.dir = Path(adapter_dir)
        self.load = load
        self.capacity = capacity
        # (name, version id) -> entry, least recently used first
        self.entries: OrderedDict[tuple[str, str], LoadedAdapter] = OrderedDict()
        self.hits = self.misses = self.evictions = self.reloads = 0
        self.pins: frozenset[str] = frozenset()  # pinned adapter names
        self.pinned_keys: set[tuple[str, str]] = set()  # their current versions, as last synced
        self.changes = 0  # counts loads, evictions and pin changes: what the worker publishes follows it
        self._activity = CacheActivity()

    def take_activity(self) -> CacheActivity:
        """The activity since the last call (then reset), with the current number of entries."""
        activity, self._activity = self._activity, CacheActivity()
        activity.loaded = len(self.entries)
        return activity

    # --- disk ---------------------------------------------------------------------------------
    def folder(self, ref: str) -> Path:
        """The folder holding the version ``ref`` names now (the adapter's own folder if none)."""
        version = self.disk_version(ref)
        return version.folder if version is not None else self.dir / split_ref(ref)[0]

    def disk_version(self, ref: str) -> Version | None:
        """The version ``ref`` (``name`` or ``name@<id prefix>``) names on disk now, or None when it does
        not exist (or the reference is invalid)."""
        if not valid_ref(ref):
            return None
        return resolve(self.dir, ref)

    def exists(self, ref: str) -> bool:
        """Whether the version is there now; a deleted adapter's idle entries are dropped on the way."""
        if self.disk_version(ref) is not None:
            return True
        name = split_ref(ref)[0]
        if valid_name(name) and self.disk_version(name) is None:
            for key, entry in list(self.entries.items()):
                if entry.name == name and entry.refs == 0:
                    del self.entries[key]
                    self.pinned_keys.discard(key)
                    entry.cached = False
                    self.changes += 1
        return False

    # --- lookups ------------------------------------------------------------------------------
    def can_acquire(self, ref: str) -> bool:
        """Whether ``acquire(ref)`` fits the capacity: loaded, room left, or an idle entry to evict."""
        v = self.disk_version(ref)
        if v is None or (split_ref(ref)[0], v.id) in self.entries:
            return True  # not found -> acquire raises at once; loaded -> hit
        if len(self.entries) < self.capacity:
            return True
        return any(self._evictable(k, e) for k, e in self.entries.items())

    def _evictable(self, key: tuple[str, str], entry: LoadedAdapter) -> bool:
        return entry.refs == 0 and key not in self.pinned_keys

    def _loaded(self, ref: str) -> tuple[str, str] | None:
        """The cache key of the version ``ref`` names when it is loaded, else None."""
        v = self.disk_version(ref)
        if v is None:
            return None
        key = (split_ref(ref)[0], v.id)
        return key if key in self.entries else None

    def can_acquire_all(self, refs: list[str]) -> bool:
        """Whether ``acquire_all(refs)`` fits the capacity: the versions not loaded need free room or
        idle entries other than the wanted ones to evict (a composition's adapters are pinned together)."""
        if len(refs) <= 1:
            return not refs or self.can_acquire(refs[0])
        wanted, missing = set(), 0
        for ref in dict.fromkeys(refs):
            v = self.disk_version(ref)
            if v is None:
                return True  # not found -> acquire_all raises at once
            key = (split_ref(ref)[0], v.id)
            wanted.add(key)
            missing += key not in self.entries
        if not missing:
            return True
        idle = sum(1 for k, e in self.entries.items() if self._evictable(k, e) and k not in wanted)
        return len(self.entries) + missing - idle <= self.capacity

    def acquire_all(self, refs: list[str]) -> list[LoadedAdapter]:
        """``acquire`` each ref (the result in ``refs``' order), all or none: on a failure the ones
        already pinned are released and the error is raised. Loaded versions are pinned first, so
        loading another one cannot evict them."""
        order = sorted(range(len(refs)), key=lambda k: self._loaded(refs[k]) is None)
        got: dict[int, LoadedAdapter] = {}
        try:
            for k in order:
                got[k] = self.acquire(refs[k])
        except BaseException:
            for entry in got.values():
                self.release(entry)
            raise
        return [got[k] for k in range(len(refs))]

    def acquire(self, ref: str) -> LoadedAdapter:
        """The version ``ref`` names (``name``: the current one), loaded if needed, pinned for one row
        (``release`` it).

        Raises FileNotFoundError (the caller's AdapterNotFound) when it is gone, AdapterError when it
        cannot be loaded.
        """
        version = self.disk_version(ref)
        if version is None:
            raise FileNotFoundError(ref)
        key = (split_ref(ref)[0], version.id)
        entry = self.entries.get(key)
        if entry is not None:
            self.hits += 1
            self._activity.hits += 1
            self.entries.move_to_end(key)
        else:
            entry = self._load(key[0], version)
            if entry.version != version.id and split_ref(ref)[1] is not None:
                # A pinned version whose folder was replaced between resolving and reading: the publish
                # kept it first, so it is read again from its kept copy (never the newer weights).
                version = self.disk_version(ref)
                if version is None or version.current:
                    raise FileNotFoundError(ref)
                entry = self._load(key[0], version)
        entry.refs += 1
        return entry

    def release(self, entry: LoadedAdapter) -> None:
        entry.refs -= 1
        if entry.refs == 0 and entry.cached and len(self.entries) > self.capacity:
            self._evict_idle()

    def _load(self, name: str, version: Version) -> LoadedAdapter:
        self.misses += 1
        self._activity.misses += 1
        t0 = time.perf_counter()
        try:
            weights, digest = self.load(version.folder)
        except FileNotFoundError:
            raise
        except Exception as exc:
            code = getattr(exc, "code", None) or (
                "invalid_adapter" if isinstance(exc, _ADAPTER_FAULTS) else "generation_failed"
            )
            if code != "invalid_adapter":
                log.exception("adapter %s: loading failed", name)
            raise AdapterError(f"adapter {name!r} cannot be loaded: {exc}", code) from exc
        if digest != version.id and not version.current:  # a kept version is never rewritten
            raise AdapterError(
                f"adapter {name!r} cannot be loaded: version {version.id[:16]} does not match its weights "
                "(corrupt on disk)"
            )
        # a current folder replaced between resolving and reading: keyed by what was read
        seconds = time.perf_counter() - t0
        self._activity.load_seconds.append(seconds)
        entry = LoadedAdapter(name, digest, weights, time.time(), seconds)
        old = self.entries.pop((name, digest), None)
        if old is not None:
            old.cached = False
        self.changes += 1
        if any(e.name == name for e in self.entries.values()):
            self.reloads += 1
            log.info("adapter %s: version %s loaded (%.1f ms)", name, digest[:12], seconds * 1e3)
        else:
            log.info("adapter %s loaded (%.1f ms)", name, seconds * 1e3)
        self.entries[(name, digest)] = entry
        self._evict_idle()
        return entry

    def _evict_idle(self) -> None:
        """Drop least recently used entries, neither held nor pinned, while over capacity."""
        for key in list(self.entries):
            if len(self.entries) <= self.capacity:
                break
            e = self.entries[key]
            if self._evictable(key, e):
                del self.entries[key]
                e.cached = False
                self.evictions += 1
                self.changes += 1
                self._activity.evictions += 1
                log.info("adapter %s version %s evicted (LRU)", e.name, e.version[:12])

    # --- pins -------------------------------------------------------------------------------------
    def set_pins(self, names: frozenset[str]) -> None:
        """The names to keep loaded; ``sync_pins`` loads them."""
        if names != self.pins:
            self.pins = frozenset(names)
            self.changes += 1
            self.sync_pins()

    def free_slots(self) -> int:
        """Entries left for adapters that are not pinned (what pinned ones do not take)."""
        return self.capacity - len(self.pinned_keys & self.entries.keys())

    def is_pinned(self, ref: str) -> bool:
        """Whether ``ref`` names the current version of a pinned adapter (it needs no free slot)."""
        version = self.disk_version(ref)
        return version is not None and (split_ref(ref)[0], version.id) in self.pinned_keys

    def sync_pins(self) -> list[str]:
        """Pin the current version of every pinned name and load the ones not loaded, as far as the
        capacity allows without evicting a held or pinned entry (the rest on a later call). Returns
        the names that failed to load (logged); a name with no folder is skipped."""
        keys: dict[tuple[str, str], Version] = {}
        for name in sorted(self.pins):
            version = self.disk_version(name) if valid_name(name) else None
            if version is not None:
                keys[(name, version.id)] = version
        if keys.keys() != self.pinned_keys:
            self.pinned_keys = set(keys)
            self.changes += 1
        failed = []
        for (name, _), version in keys.items():
            if (name, version.id) in self.entries:
                continue
            if len(self.entries) >= self.capacity and not any(
                self._evictable(k, e) for k, e in self.entries.items()
            ):
                break
            try:
                entry = self._load(name, version)
            except (FileNotFoundError, AdapterError) as exc:
                log.warning("pinned adapter %s: not loaded: %s", name, exc)
                failed.append(name)
                continue
            self.pinned_keys.add((name, entry.version))  # replaced meanwhile: the next call re-pins
        return failed

    def loaded(self) -> list[str]:
        """The names with at least one version loaded, least recently used first."""
        return list(dict.fromkeys(e.name for e in self.entries.values()))

    def stats(self) -> dict:
        return {
            "capacity": self.capacity,
            "pinned": sorted(self.pins),
            "loaded": [
                {
                    "name": e.name,
                    "version": e.version,
                    "pinned": key in self.pinned_keys,
                    "refs": e.refs,
                    "load_ms": round(e.load_seconds * 1e3, 2),
                    "rank": getattr(e.weights, "rank", None),
                    "bytes": getattr(e.weights, "nbytes", None),
                }
                for key, e in self.entries.items()
            ],
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "reloads": self.reloads,
        }
