"""The generation worker's LRU of loaded adapters, kept in step with the adapter directory.

The directory is the source of truth: every lookup stats ``<adapter_dir>/<name>/adapter_model.safetensors``.
A new folder is loaded on its first request; a replaced one (different inode, size or mtime: the
publish path swaps whole folders) is reloaded on the next request; a deleted one is not found.
An entry is *pinned* while rows of the running batch use it: pinned entries are never evicted, and
a replaced or evicted version stays alive (held by its rows) until those rows finish, so running
rows keep the weights they started with. At most ``capacity`` entries are cached; when all are
pinned, ``can_acquire`` says no and the scheduler keeps the request waiting.

The cache counts its hits, misses, evictions and load times in ``CacheActivity``; the engine hands
it to its caller with each step (``StepReport.adapters``), and the worker exports it as metrics.
Used from the engine's single thread only (no locks).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.artifact import valid_name

from .lora import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Version:
    """Identity of one version of an adapter folder's weights file."""

    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Version:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(eq=False)
class LoadedAdapter:
    name: str
    version: Version
    weights: Any  # engine.lora.LoraWeights
    loaded_at: float
    load_seconds: float
    refs: int = 0  # running rows using this version
    cached: bool = True  # False once evicted or superseded (kept alive only by its rows)
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
    """An adapter folder exists but cannot be loaded (bad format, shapes, I/O); names the adapter."""


class AdapterCache:
    def __init__(
        self, adapter_dir: str | Path, load: Callable[[Path], tuple[Any, os.stat_result]], capacity: int
    ):
        """``load(folder) -> (weights, stat of the weights file as read)`` raises on a bad adapter."""
        if capacity < 1:
            raise ValueError("max_loaded_adapters must be >= 1")
        self.dir = Path(adapter_dir)
        self.load = load
        self.capacity = capacity
        self.entries: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first
        self.hits = self.misses = self.evictions = self.reloads = 0
        self._activity = CacheActivity()

    def take_activity(self) -> CacheActivity:
        """The activity since the last call (then reset), with the current number of entries."""
        activity, self._activity = self._activity, CacheActivity()
        activity.loaded = len(self.entries)
        return activity

    # --- disk ---------------------------------------------------------------------------------
    def folder(self, name: str) -> Path:
        return self.dir / name

    def disk_version(self, name: str) -> Version | None:
        """The version on disk now, or None when the adapter does not exist (or the name is invalid)."""
        if not valid_name(name):
            return None
        try:
            st = os.stat(self.folder(name) / WEIGHTS_FILE)
            if not (self.folder(name) / CONFIG_FILE).is_file():
                return None
        except OSError:
            return None
        return Version.of(st)

    def exists(self, name: str) -> bool:
        """Whether the folder is there now; a deleted adapter's idle entry is dropped on the way."""
        if self.disk_version(name) is not None:
            return True
        entry = self.entries.get(name)
        if entry is not None and entry.refs == 0:
            del self.entries[name]
            entry.cached = False
        return False

    # --- lookups ------------------------------------------------------------------------------
    def _current(self, name: str, version: Version) -> LoadedAdapter | None:
        entry = self.entries.get(name)
        return entry if entry is not None and entry.version == version else None

    def can_acquire(self, name: str) -> bool:
        """Whether ``acquire(name)`` fits the capacity: loaded, room left, or an idle entry to evict."""
        v = self.disk_version(name)
        if v is None or self._current(name, v) is not None:
            return True  # not found -> acquire raises at once; loaded -> hit
        if len(self.entries) < self.capacity:
            return True
        return any(e.refs == 0 or e.name == name for e in self.entries.values())

    def can_acquire_all(self, names: list[str]) -> bool:
        """Whether ``acquire_all(names)`` fits the capacity: the adapters not loaded need free room or
        idle entries other than ``names`` to evict (a composition's adapters are pinned together)."""
        if len(names) <= 1:
            return not names or self.can_acquire(names[0])
        wanted = set(names)
        missing = new = 0
        for name in wanted:
            v = self.disk_version(name)
            if v is None:
                return True  # not found -> acquire_all raises at once
            if self._current(name, v) is None:
                missing += 1
                new += name not in self.entries  # a stale entry is replaced, not added
        if not missing:
            return True
        idle = sum(1 for e in self.entries.values() if e.refs == 0 and e.name not in wanted)
        return len(self.entries) + new - idle <= self.capacity

    def acquire_all(self, names: list[str]) -> list[LoadedAdapter]:
        """``acquire`` each name (the result in ``names``' order), all or none: on a failure the ones
        already pinned are released and the error is raised. Loaded names are pinned first, so
        loading another one cannot evict them."""

        def loaded(name: str) -> bool:
            v = self.disk_version(name)
            return v is not None and self._current(name, v) is not None

        order = sorted(range(len(names)), key=lambda k: not loaded(names[k]))
        got: dict[int, LoadedAdapter] = {}
        try:
            for k in order:
                got[k] = self.acquire(names[k])
        except BaseException:
            for entry in got.values():
                self.release(entry)
            raise
        return [got[k] for k in range(len(names))]

    def acquire(self, name: str) -> LoadedAdapter:
        """The current version of ``name``, loaded if needed, pinned for one row (``release`` it).

        Raises KeyError (via the caller's AdapterNotFound) when the folder is gone, AdapterError when
        it cannot be loaded.
        """
        version = self.disk_version(name)
        if version is None:
            raise FileNotFoundError(name)
        entry = self._current(name, version)
        if entry is not None:
            self.hits += 1
            self._activity.hits += 1
            self.entries.move_to_end(name)
        else:
            entry = self._load(name)
        entry.refs += 1
        return entry

    def release(self, entry: LoadedAdapter) -> None:
        entry.refs -= 1
        if entry.refs == 0 and entry.cached and len(self.entries) > self.capacity:
            self._evict_idle()

    def _load(self, name: str) -> LoadedAdapter:
        self.misses += 1
        self._activity.misses += 1
        t0 = time.perf_counter()
        try:
            weights, st = self.load(self.folder(name))
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise AdapterError(f"adapter {name!r} cannot be loaded: {exc}") from exc
        seconds = time.perf_counter() - t0
        self._activity.load_seconds.append(seconds)
        entry = LoadedAdapter(name, Version.of(st), weights, time.time(), seconds)
        old = self.entries.pop(name, None)
        if old is not None:  # superseded: its running rows keep it alive
            old.cached = False
            self.reloads += 1
            log.info("adapter %s: new version loaded (%.1f ms)", name, seconds * 1e3)
        else:
            log.info("adapter %s loaded (%.1f ms)", name, seconds * 1e3)
        self.entries[name] = entry
        self._evict_idle()
        return entry

    def _evict_idle(self) -> None:
        """Drop least recently used unpinned entries while over capacity."""
        for name in list(self.entries):
            if len(self.entries) <= self.capacity:
                break
            e = self.entries[name]
            if e.refs == 0:
                del self.entries[name]
                e.cached = False
                self.evictions += 1
                self._activity.evictions += 1
                log.info("adapter %s evicted (LRU)", name)

    def loaded(self) -> list[str]:
        return list(self.entries)

    def stats(self) -> dict:
        return {
            "capacity": self.capacity,
            "loaded": [
                {
                    "name": e.name,
                    "refs": e.refs,
                    "load_ms": round(e.load_seconds * 1e3, 2),
                    "rank": getattr(e.weights, "rank", None),
                    "bytes": getattr(e.weights, "nbytes", None),
                }
                for e in self.entries.values()
            ],
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "reloads": self.reloads,
        }
