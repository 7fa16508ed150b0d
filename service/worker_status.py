"""The generation worker's status file (``settings.worker_status_path``): one owner for its format.

The worker writes it (``service.worker``); the API processes read it for readiness and adapter
listings, and the job runner reads its ``load`` to decide whether training yields to serving
(``docs/jobs.md``, "Serving first"). Kept free of torch and LitServe so the runner can import it.

    {"status": "starting|ready|failed", "model", "device", ..., "loaded_adapters": [...], "adapter_pins",
     "adapter_cache": [{"name", "version", "pinned", "rank"}, ...], "pinned_adapters": [...],
     "max_loaded_adapters": int, "batch": {"rows", "kv_budget_bytes", ...} (``engine.capacity.BatchPlan``),
     "kv_cache": {"block_tokens", "blocks_used", "blocks_total", ...} (``Engine.kv_use``),
     "load": {"waiting": int, "running": int, "time": unix seconds, "tokens_per_s": float,
              "running_adapters": [...], "waiting_adapters": [...]}, "pid", "updated"}

``load.waiting`` counts requests taken by the worker but not yet in the batch (its own queue plus
the engine's scheduler); ``load.running`` the rows of the running batch. The worker rewrites ``load``
every ``LOAD_EVERY_S`` while busy and once when it becomes idle, so a busy ``load`` older than
``LOAD_STALE_S`` means the worker stopped writing (hung or gone) and is read as idle.
``load.tokens_per_s`` is the decode rate of recent busy time; the API processes admit a request only
when the work ahead of it, at that rate, ends before its deadline (``service.gateway``).
``adapter_cache`` is every entry of the adapter cache (one per version loaded; ``LoadedEntry``), rewritten
whenever the cache changes, ``pinned_adapters`` the pinned names (``service.adapters.pins``) and
``adapter_pins`` the references running rows hold on entries (0 when idle).
``load.running_adapters`` and ``load.waiting_adapters`` name the adapters of those requests (sorted;
the base model is not named): ``/metrics`` exports them as ``loraserve_lora_requests_info``
(``service.metrics.WorkerStatusCollector``), the current state only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loracore.atomic import write_atomic

LOAD_EVERY_S = 0.2  # how often a busy worker refreshes its load
LOAD_STALE_S = 5.0  # a busy load older than this is not believed (an engine step is far shorter)


@dataclass(frozen=True)
class Load:
    waiting: int
    running: int
    time: float  # time.time() when the worker measured it
    tokens_per_s: float | None = None  # generated tokens per busy second, recent (None: not measured yet)
    running_adapters: tuple[str, ...] = ()  # adapters of the running rows, sorted
    waiting_adapters: tuple[str, ...] = ()  # adapters of the waiting requests, sorted

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"waiting": self.waiting, "running": self.running, "time": round(self.time, 3)}
        if self.tokens_per_s is not None:
            out["tokens_per_s"] = round(self.tokens_per_s, 2)
        out["running_adapters"] = list(self.running_adapters)
        out["waiting_adapters"] = list(self.waiting_adapters)
        return out


@dataclass(frozen=True)
class LoadedEntry:
    """One entry of the worker's adapter cache: a version of an adapter held in memory."""

    name: str
    version: str  # the version id (sha256 of the weights)
    pinned: bool
    rank: int | None

    @classmethod
    def of(cls, entry: dict[str, Any]) -> LoadedEntry:
        """From an entry of ``AdapterCache.stats()["loaded"]``, or of the status file."""
        rank = entry.get("rank")
        return cls(str(entry["name"]), str(entry["version"]), bool(entry.get("pinned")), _int_or_none(rank))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "pinned": self.pinned, "rank": self.rank}


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def read_cache(status: dict[str, Any] | None) -> list[LoadedEntry]:
    """The adapter cache's entries as the worker last published them (none when unreadable)."""
    out = []
    for raw in (status or {}).get("adapter_cache") or ():
        try:
            out.append(LoadedEntry.of(raw))
        except (KeyError, TypeError, AttributeError):
            continue
    return out


def write_status(path: str | Path, status: dict[str, Any]) -> None:
    """Written atomically (readers see a whole file); not fsynced: it is rewritten often and
    deleted at every start, so durability buys nothing and an fsync would stall the worker."""
    body = dict(status, pid=os.getpid(), updated=datetime.now(UTC).isoformat())
    write_atomic(Path(path), json.dumps(body, indent=2) + "\n", durable=False)


def read_status(path: str | Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: Any) -> bool:
    """Whether the process that wrote a status file (its ``pid``) still runs."""
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def read_load(status: dict[str, Any] | None, now: float | None = None) -> Load | None:
    """The worker's load, or None when there is none to believe (no file, no load, a stale busy one)."""
    raw = (status or {}).get("load")
    if not isinstance(raw, dict):
        return None
    try:
        rate = raw.get("tokens_per_s")
        load = Load(
            int(raw["waiting"]),
            int(raw["running"]),
            float(raw["time"]),
            float(rate) if rate is not None else None,
            tuple(str(n) for n in raw.get("running_adapters") or ()),
            tuple(str(n) for n in raw.get("waiting_adapters") or ()),
        )
    except (KeyError, TypeError, ValueError):
        return None
    now = time.time() if now is None else now
    if (load.waiting or load.running) and now - load.time > LOAD_STALE_S:
        return None
    return load


def serving_busy(load: Load | None, running_rows: int) -> bool:
    """The policy: serving is busy while a request waits or the batch has ``running_rows`` rows or more.

    ``running_rows`` 0 turns yielding off.
    """
    if load is None or running_rows <= 0:
        return False
    return load.waiting > 0 or load.running >= running_rows
