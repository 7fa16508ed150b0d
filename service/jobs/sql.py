"""The job store: one interface, two backends, versioned migrations. Every API process and every job
runner shares it. What it stores (Job, Dataset, the statuses) is ``service.jobs.model``.

- **SQLite** (a path, the default): WAL mode, one host. Each call opens its own short connection
  (processes are forked; a connection must never cross a fork) and every write runs in
  ``BEGIN IMMEDIATE``, so concurrent writers queue on SQLite's lock instead of losing updates.
- **PostgreSQL** (a ``postgresql://`` URL): runners and servers on many hosts. Each call opens its own
  connection too; every write is one transaction. Where a write reads before it decides (a new
  job's idempotency key and busy-adapter check, the running-jobs count of a claim, a schema
  migration) it first takes a transaction-scoped advisory lock, the equivalent of SQLite's write
  lock for that one operation. Claims pick their row with ``SELECT ... FOR UPDATE SKIP LOCKED``.

The SQL is shared (plain types, no engine functions, ``?`` placeholders that the PostgreSQL backend
spells ``%s``). State changes are compare-and-set (``UPDATE ... WHERE status = ?``), and a running
job belongs to the runner holding its lease (``lease_owner``, ``lease_expires``, renewed by
heartbeats): a runner whose lease is gone may not write the job any more. The schema is versioned
(``schema_version``, ``MIGRATIONS``). A database that cannot be reached raises ``StoreUnavailable``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from service.jobs.lease import owner_is_dead
from service.jobs.model import FINISHED, STATUSES, Dataset, Job, StoreConflict, StoreUnavailable
from service.settings import is_database_url

# Schema migrations, in order: version N is reached by running MIGRATIONS[N - 1]. Never edit a
# released step; append one. Both backends run the same statements.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            adapter TEXT NOT NULL,
            status TEXT NOT NULL,
            error TEXT,
            overwrite INTEGER NOT NULL DEFAULT 0,
            base_model TEXT,
            dataset TEXT,
            num_rows INTEGER NOT NULL DEFAULT 0,
            progress TEXT NOT NULL DEFAULT '{}',
            created_at DOUBLE PRECISION NOT NULL,
            started_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION,
            updated_at DOUBLE PRECISION NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            resume INTEGER NOT NULL DEFAULT 0,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_expires DOUBLE PRECISION,
            trainer_pid INTEGER
        )""",
        "CREATE INDEX jobs_status ON jobs (status, created_at)",
        "CREATE INDEX jobs_adapter ON jobs (adapter, status)",
        """CREATE TABLE idempotency_keys (
            key TEXT PRIMARY KEY,
            request_hash TEXT NOT NULL,
            job_id TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE datasets (
            id TEXT PRIMARY KEY,
            num_rows INTEGER NOT NULL,
            size_bytes INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
    ],
    [
        "ALTER TABLE jobs ADD COLUMN eval TEXT",
        "ALTER TABLE jobs ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]'",
    ],
    ["ALTER TABLE jobs ADD COLUMN pause_requested INTEGER NOT NULL DEFAULT 0"],
]
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMN_NAMES = (
    "id",
    "adapter",
    "status",
    "error",
    "overwrite",
    "base_model",
    "dataset",
    "num_rows",
    "progress",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
    "attempts",
    "resume",
    "cancel_requested",
    "lease_owner",
    "lease_expires",
    "trainer_pid",
    "eval",
    "warnings",
    "pause_requested",
)
_COLUMNS = ", ".join(_COLUMN_NAMES)
# PostgreSQL advisory lock keys (transaction scope) of the writes that read before they decide.
_LOCKS = {name: zlib.crc32(f"loraserve.jobs.{name}".encode()) for name in ("migrate", "create", "claim")}


# An unreachable database host must not hold an API request (or the runner's loop) for long.
PG_CONNECT_TIMEOUT_S = 5


def _key_reused() -> StoreConflict:
    return StoreConflict(
        "idempotency_key_reused",
        "this Idempotency-Key was already used with a different request body",
        "Idempotency-Key",
    )


def _job_from_row(row: tuple) -> Job:
    d = dict(zip(_COLUMN_NAMES, row, strict=True))
    d["progress"] = json.loads(d["progress"] or "{}")
    d["eval"] = json.loads(d["eval"]) if d["eval"] else None
    d["warnings"] = json.loads(d["warnings"] or "[]")
    for key in ("overwrite", "resume", "cancel_requested", "pause_requested"):
        d[key] = bool(d[key])
    return Job(**d)


_PROCESS_STORES: dict[tuple[int, str], JobStore] = {}


def process_store(location: str | Path) -> JobStore:
    """This process's store for ``location``, made on first use: LitServe forks API processes after
    the routes are registered, and nothing made before a fork may be used after it."""
    key = (os.getpid(), str(location))
    if key not in _PROCESS_STORES:
        _PROCESS_STORES[key] = JobStore(location)
    return _PROCESS_STORES[key]


def redact(location: str | Path) -> str:
    """``location`` fit for a log line: a URL's password is replaced by ``***``."""
    if not is_database_url(location):
        return str(location)
    parts = urlsplit(str(location))
    if parts.password is None:
        return str(location)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class _Connection:
    """One connection of either backend, with the shared SQL's ``?`` placeholders."""

    def __init__(self, raw: Any, postgres: bool):
        self.raw, self.postgres = raw, postgres

    def execute(self, sql: str, params: tuple | list = ()) -> Any:
        return self.raw.execute(sql.replace("?", "%s") if self.postgres else sql, params)


class _SQLite:
    postgres = False
    skip_locked = ""  # BEGIN IMMEDIATE already holds the whole database
    for_update = ""

    def __init__(self, path: Path, busy_timeout: float):
        self.path, self.busy_timeout = path, busy_timeout
        path.parent.mkdir(parents=True, exist_ok=True)
        con = self._connect()
        try:
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE itself.
        con = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        con.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        con.execute("PRAGMA synchronous=FULL")  # a finished job's row must survive a power cut too
        return con

    @contextmanager
    def read(self) -> Iterator[_Connection]:
        con = self._connect()
        try:
            yield _Connection(con, False)
        finally:
            con.close()

    @contextmanager
    def write(self, lock: str | None = None) -> Iterator[_Connection]:
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield _Connection(con, False)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    @staticmethod
    def columns(con: _Connection, table: str) -> set[str]:
        return {row[1] for row in con.execute(f"PRAGMA table_info({table})")}  # SQLite's own catalogue


class _Postgres:
    postgres = True
    skip_locked = " FOR UPDATE SKIP LOCKED"
    for_update = " FOR UPDATE"

    def __init__(self, url: str, connect_timeout: float):
        import psycopg  # only stores on PostgreSQL need the driver loaded

        self.psycopg, self.url, self.connect_timeout = psycopg, url, connect_timeout

    def _connect(self, autocommit: bool) -> Any:
        try:
            return self.psycopg.connect(
                self.url, autocommit=autocommit, connect_timeout=max(1, round(self.connect_timeout))
            )
        except self.psycopg.OperationalError as exc:
            raise StoreUnavailable(f"job store {redact(self.url)} unreachable: {exc}".strip()) from exc

    @contextmanager
    def _unavailable_on_disconnect(self) -> Iterator[None]:
        try:
            yield
        except self.psycopg.OperationalError as exc:  # the server went away mid-call
            raise StoreUnavailable(f"job store {redact(self.url)} connection lost: {exc}".strip()) from exc

    @contextmanager
    def read(self) -> Iterator[_Connection]:
        with self._unavailable_on_disconnect():
            con = self._connect(autocommit=True)
            try:
                yield _Connection(con, True)
            finally:
                con.close()

    @contextmanager
    def write(self, lock: str | None = None) -> Iterator[_Connection]:
        with self._unavailable_on_disconnect():
            con = self._connect(autocommit=False)
            try:
                with con.transaction():
                    if lock is not None:
                        con.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCKS[lock],))
                    yield _Connection(con, True)
            finally:
                con.close()

    @staticmethod
    def columns(con: _Connection, table: str) -> set[str]:
        rows = con.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        )
        return {row[0] for row in rows}


class JobStore:
    """All reads and writes of jobs, idempotency keys and datasets, on SQLite or PostgreSQL."""

    def __init__(self, location: str | Path, busy_timeout: float = 30.0):
        """``location``: a SQLite file path, or a ``postgresql://`` URL (``is_database_url``).
        ``busy_timeout``: how long a SQLite writer waits for the lock."""
        self.location = location
        if is_database_url(location):
            self.backend: _SQLite | _Postgres = _Postgres(str(location), PG_CONNECT_TIMEOUT_S)
        else:
            self.backend = _SQLite(Path(location), busy_timeout)
        self._migrate()

    def _migrate(self) -> None:
        """Bring the schema to ``SCHEMA_VERSION``; concurrent openers wait for each other."""
        with self._write("migrate") as con:
            con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = con.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                # 0: a new store. 1: a SQLite store from before schema_version, which got step 2's
                # columns one by one as they were added: add the missing ones, and it is at 2.
                have = self.backend.columns(con, "jobs")
                version = 1 if have else 0
                if have:
                    for stmt in MIGRATIONS[1]:
                        if stmt.split()[5] not in have:  # ALTER TABLE jobs ADD COLUMN <name> ...
                            con.execute(stmt)
                    version = 2
                con.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            else:
                version = row[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the job store's schema is version {version}, newer than this loraserve's "
                    f"({SCHEMA_VERSION}): upgrade loraserve"
                )
            for step in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[step]:
                    con.execute(stmt)
            if version < SCHEMA_VERSION:
                con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    # --- connections ---------------------------------------------------------------------------
    def _read(self):
        return self.backend.read()

    def _write(self, lock: str | None = None):
        """One write transaction; ``lock`` names the PostgreSQL advisory lock a read-then-write takes."""
        return self.backend.write(lock)

    @staticmethod
    def _get(con: _Connection, job_id: str) -> Job | None:
        row = con.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job_from_row(row) if row else None

    # --- API side ------------------------------------------------------------------------------
    def create_job(
        self,
        job: Job,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        before_insert: Callable[[], None] | None = None,
    ) -> tuple[Job, bool]:
        """Insert a queued job; returns (job, created).

        With an idempotency key already used for the same request, returns that job and False; for a
        different request raises ``StoreConflict("idempotency_key_reused")``. A queued, running or paused
        job for the same adapter raises ``StoreConflict("adapter_busy")``. ``before_insert`` runs inside
        the transaction (after the checks) so callers can refuse at the last moment.
        """
        now = time.time()
        with self._write("create") as con:
            if idempotency_key is not None:
                hit = con.execute(
                    "SELECT request_hash, job_id FROM idempotency_keys WHERE key = ?", (idempotency_key,)
                ).fetchone()
                if hit is not None:
                    if hit[0] != request_hash:
                        raise _key_reused()
                    existing = self._get(con, hit[1])
                    if existing is not None:
                        return existing, False
            busy = con.execute(
                "SELECT id FROM jobs WHERE adapter = ? AND status IN ('queued', 'running', 'paused')",
                (job.adapter,),
            ).fetchone()
            if busy is not None:
                raise StoreConflict(
                    "adapter_busy",
                    f"adapter '{job.adapter}' is already being trained by job {busy[0]}; "
                    "cancel it or wait for it to finish",
                    "adapter",
                )
            if before_insert is not None:
                before_insert()
            con.execute(
                "INSERT INTO jobs (id, adapter, status, overwrite, base_model, dataset, num_rows, progress, "
                "created_at, updated_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, '{}', ?, ?)",
                (
                    job.id,
                    job.adapter,
                    int(job.overwrite),
                    job.base_model,
                    job.dataset,
                    job.num_rows,
                    now,
                    now,
                ),
            )
            if idempotency_key is not None:
                con.execute(
                    "INSERT INTO idempotency_keys (key, request_hash, job_id, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (idempotency_key, request_hash, job.id, now),
                )
            created = self._get(con, job.id)
        assert created is not None
        return created, True

    def find_idempotent(self, key: str, request_hash: str) -> Job | None:
        """The job an Idempotency-Key made, or None; ``StoreConflict`` if it came with another request."""
        with self._read() as con:
            hit = con.execute(
                "SELECT request_hash, job_id FROM idempotency_keys WHERE key = ?", (key,)
            ).fetchone()
            if hit is None:
                return None
            if hit[0] != request_hash:
                raise _key_reused()
            return self._get(con, hit[1])

    def get(self, job_id: str) -> Job | None:
        with self._read() as con:
            return self._get(con, job_id)

    def list_jobs(self, status: str | None = None, limit: int = 100) -> list[Job]:
        with self._read() as con:
            if status is None:
                rows = con.execute(
                    f"SELECT {_COLUMNS} FROM jobs ORDER BY created_at DESC, id LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = con.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE status = ? ORDER BY created_at DESC, id LIMIT ?",
                    (status, limit),
                ).fetchall()
        return [_job_from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._read() as con:
            rows = con.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        out = dict.fromkeys(STATUSES, 0)
        out.update({s: n for s, n in rows})
        return out

    def request_cancel(self, job_id: str) -> Job | None:
        """Queued or paused → cancelled now; running → flagged, the runner stops the trainer. None if
        unknown."""
        now = time.time()
        with self._write() as con:
            con.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, updated_at = ?, error = NULL, "
                "pause_requested = 0 WHERE id = ? AND status IN ('queued', 'paused')",
                (now, now, job_id),
            )
            con.execute(
                "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ? AND status = 'running'",
                (now, job_id),
            )
            return self._get(con, job_id)

    def request_pause(self, job_id: str) -> Job | None:
        """Queued → paused now; running → flagged, the runner stops the trainer (it writes a checkpoint)
        and the job is paused. A job asked to cancel is not paused. None if unknown."""
        now = time.time()
        with self._write() as con:
            con.execute(
                "UPDATE jobs SET status = 'paused', updated_at = ? WHERE id = ? AND status = 'queued'",
                (now, job_id),
            )
            con.execute(
                "UPDATE jobs SET pause_requested = 1, updated_at = ? "
                "WHERE id = ? AND status = 'running' AND cancel_requested = 0",
                (now, job_id),
            )
            return self._get(con, job_id)

    def resume(self, job_id: str) -> Job | None:
        """Paused → queued (the next claim resumes it from its checkpoint); a running job's pause not yet
        carried out is withdrawn. None if unknown."""
        now = time.time()
        with self._write() as con:
            con.execute(
                "UPDATE jobs SET status = 'queued', updated_at = ? WHERE id = ? AND status = 'paused'",
                (now, job_id),
            )
            con.execute(
                "UPDATE jobs SET pause_requested = 0, updated_at = ? "
                "WHERE id = ? AND status = 'running' AND pause_requested = 1",
                (now, job_id),
            )
            return self._get(con, job_id)

    # --- datasets ------------------------------------------------------------------------------
    def add_dataset(self, ds: Dataset) -> None:
        with self._write() as con:
            con.execute(
                "INSERT INTO datasets (id, num_rows, size_bytes, sha256, created_at) VALUES (?, ?, ?, ?, ?)",
                (ds.id, ds.num_rows, ds.size_bytes, ds.sha256, ds.created_at),
            )

    def get_dataset(self, dataset_id: str) -> Dataset | None:
        with self._read() as con:
            row = con.execute(
                "SELECT id, num_rows, size_bytes, sha256, created_at FROM datasets WHERE id = ?",
                (dataset_id,),
            ).fetchone()
        return Dataset(*row) if row else None

    def list_datasets(self) -> list[Dataset]:
        """Every dataset, newest first."""
        with self._read() as con:
            rows = con.execute(
                "SELECT id, num_rows, size_bytes, sha256, created_at FROM datasets "
                "ORDER BY created_at DESC, id"
            ).fetchall()
        return [Dataset(*r) for r in rows]

    def delete_dataset(self, dataset_id: str) -> bool:
        """Forget a dataset; False if unknown. Jobs keep their own copies of its rows."""
        with self._write() as con:
            return con.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,)).rowcount == 1

    # --- runner side ---------------------------------------------------------------------------
    def claim_next(self, owner: str, lease_seconds: float, max_running: int) -> Job | None:
        """Take the oldest queued job if fewer than ``max_running`` jobs run (across all runners)."""
        now = time.time()
        with self._write("claim") as con:  # the count holds while this transaction runs
            (running,) = con.execute("SELECT COUNT(*) FROM jobs WHERE status = 'running'").fetchone()
            if running >= max_running:
                return None
            row = con.execute(
                "SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at, id LIMIT 1"
                + self.backend.skip_locked
            ).fetchone()
            if row is None:
                return None
            cur = con.execute(
                "UPDATE jobs SET status = 'running', lease_owner = ?, lease_expires = ?, updated_at = ?, "
                "started_at = COALESCE(started_at, ?), attempts = attempts + 1, trainer_pid = NULL "
                "WHERE id = ? AND status = 'queued'",
                (owner, now + lease_seconds, now, now, row[0]),
            )
            if cur.rowcount != 1:
                return None
            return self._get(con, row[0])

    def heartbeat(self, job_id: str, owner: str, lease_seconds: float) -> Job | None:
        """Renew the lease; returns the job (with ``cancel_requested``), or None if the lease is lost."""
        now = time.time()
        with self._write() as con:
            cur = con.execute(
                "UPDATE jobs SET lease_expires = ? WHERE id = ? AND status = 'running' AND lease_owner = ?",
                (now + lease_seconds, job_id, owner),
            )
            return self._get(con, job_id) if cur.rowcount == 1 else None

    def set_trainer_pid(self, job_id: str, owner: str, pid: int | None) -> bool:
        with self._write() as con:
            cur = con.execute(
                "UPDATE jobs SET trainer_pid = ?, updated_at = ? WHERE id = ? AND status = 'running' "
                "AND lease_owner = ?",
                (pid, time.time(), job_id, owner),
            )
            return cur.rowcount == 1

    def update_progress(self, job_id: str, owner: str, progress: dict[str, Any]) -> bool:
        with self._write() as con:
            cur = con.execute(
                "UPDATE jobs SET progress = ?, updated_at = ? WHERE id = ? AND status = 'running' "
                "AND lease_owner = ?",
                (json.dumps(progress), time.time(), job_id, owner),
            )
            return cur.rowcount == 1

    def finish(
        self,
        job_id: str,
        owner: str,
        status: str,
        error: str | None = None,
        *,
        eval_report: dict[str, Any] | None = None,
        warnings: list[str] | None = None,
    ) -> Job | None:
        """running → succeeded|failed|cancelled, only by the lease holder. None if the lease was lost."""
        assert status in FINISHED
        now = time.time()
        report = json.dumps(eval_report) if eval_report is not None else None
        with self._write() as con:
            cur = con.execute(
                "UPDATE jobs SET status = ?, error = ?, finished_at = ?, updated_at = ?, lease_owner = NULL, "
                "lease_expires = NULL, trainer_pid = NULL, eval = ?, warnings = ?, pause_requested = 0 "
                "WHERE id = ? AND status = 'running' AND lease_owner = ?",
                (status, error, now, now, report, json.dumps(warnings or []), job_id, owner),
            )
            return self._get(con, job_id) if cur.rowcount == 1 else None

    def release(self, job_id: str, owner: str) -> bool:
        """Give a running job back (its trainer stopped cleanly, with a checkpoint): to the queue, where
        the next runner resumes it, or, when a pause was asked for, to ``paused``.

        The attempt is not counted: a clean stop is not a failure.
        """
        now = time.time()
        with self._write() as con:
            cur = con.execute(
                "UPDATE jobs SET status = CASE WHEN pause_requested = 1 THEN 'paused' ELSE 'queued' END, "
                "pause_requested = 0, resume = 1, attempts = attempts - 1, lease_owner = NULL, "
                "lease_expires = NULL, trainer_pid = NULL, updated_at = ? "
                "WHERE id = ? AND status = 'running' AND lease_owner = ? AND cancel_requested = 0",
                (now, job_id, owner),
            )
            return cur.rowcount == 1

    def recover_stale(
        self,
        max_attempts: int,
        is_dead: Callable[[str | None], bool] = owner_is_dead,
        skip_owner: str | None = None,
    ) -> list[tuple[Job, str]]:
        """Running jobs whose runner is gone (lease expired, or its process is dead on this host).

        Each goes back to the queue to resume from its last checkpoint, or, after ``max_attempts``
        interrupted runs, fails with the reason; one already asked to cancel is cancelled, one asked to
        pause is paused.
        Jobs of ``skip_owner`` (the caller, alive by definition) are left alone.
        Returns [(job as it was, new status)].
        """
        now = time.time()
        out: list[tuple[Job, str]] = []
        with self._write() as con:
            rows = con.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status = 'running'" + self.backend.for_update
            ).fetchall()
            for job in map(_job_from_row, rows):
                if skip_owner is not None and job.lease_owner == skip_owner:
                    continue
                expired = job.lease_expires is None or job.lease_expires < now
                if not (expired or is_dead(job.lease_owner)):
                    continue
                if job.cancel_requested:
                    new, error = "cancelled", None
                elif job.pause_requested:  # it resumes from its last checkpoint when resumed
                    new, error = "paused", None
                elif job.attempts >= max_attempts:
                    new = "failed"
                    error = (
                        f"training was interrupted {job.attempts} times (the job runner stopped without "
                        "finishing it, e.g. the server was killed); giving up"
                    )
                else:
                    new, error = "queued", None
                finished_at = now if new != "queued" else None
                cur = con.execute(
                    "UPDATE jobs SET status = ?, error = ?, resume = 1, lease_owner = NULL, "
                    "lease_expires = NULL, finished_at = ?, updated_at = ?, pause_requested = 0 "
                    "WHERE id = ? AND status = 'running' AND COALESCE(lease_owner, '') = ?",
                    (new, error, finished_at, now, job.id, job.lease_owner or ""),
                )
                if cur.rowcount == 1:
                    out.append((job, new))
        return out
