"""The job store on its own, on both backends (SQLite file and a real PostgreSQL server): state
changes, leases, recovery, migrations and several processes at once."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.jobs.lease import make_owner_id, owner_is_dead
from service.jobs.model import Job, StoreConflict, new_job_id
from service.jobs.sql import JobStore

CTX = mp.get_context("spawn")  # fresh interpreters: nothing shared but the database file


def _job(adapter: str = "a", **kw) -> Job:
    return Job(id=new_job_id(), adapter=adapter, status="queued", **kw)


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty store of each backend: a SQLite path, or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.sqlite3")
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def store(location: str) -> JobStore:
    return JobStore(location)


def test_create_get_list_and_counts(store: JobStore) -> None:
    a, created = store.create_job(_job("one", num_rows=3))
    assert created and a.status == "queued" and a.num_rows == 3 and a.created_at > 0
    b, _ = store.create_job(_job("two"))
    assert store.get(a.id) == a
    assert store.get("job-" + "0" * 20) is None
    assert [j.id for j in store.list_jobs()] == [b.id, a.id]  # newest first
    assert store.list_jobs("running") == []
    assert store.counts()["queued"] == 2
    assert store.request_cancel(a.id).status == "cancelled"
    assert store.counts() == {
        "queued": 1, "running": 0, "paused": 0, "succeeded": 0, "failed": 0, "cancelled": 1
    }  # fmt: skip
    assert store.list_jobs("cancelled")[0].finished_at is not None


def test_idempotency_key_and_busy_adapter(store: JobStore) -> None:
    first, created = store.create_job(_job("x"), "key-1", "hash-a")
    again, created_again = store.create_job(_job("x"), "key-1", "hash-a")
    assert created and not created_again and again.id == first.id
    assert store.find_idempotent("key-1", "hash-a").id == first.id
    assert store.find_idempotent("key-2", "hash-a") is None
    with pytest.raises(StoreConflict) as err:
        store.create_job(_job("y"), "key-1", "hash-b")
    assert err.value.code == "idempotency_key_reused"
    with pytest.raises(StoreConflict) as err:
        store.find_idempotent("key-1", "hash-b")
    assert err.value.code == "idempotency_key_reused"
    with pytest.raises(StoreConflict) as err:  # same adapter while the first job is active
        store.create_job(_job("x"))
    assert err.value.code == "adapter_busy" and first.id in err.value.message
    store.request_cancel(first.id)
    assert store.create_job(_job("x"))[1]  # a finished job no longer blocks the name


def test_claim_lease_finish(store: JobStore) -> None:
    j1, _ = store.create_job(_job("a"))
    j2, _ = store.create_job(_job("b"))
    me, other = "host|1|1|me", "host|2|2|other"
    got = store.claim_next(me, 30, max_running=1)
    assert got.id == j1.id and got.status == "running" and got.attempts == 1 and got.lease_owner == me
    assert store.claim_next(other, 30, max_running=1) is None  # the limit counts every runner's jobs
    assert store.heartbeat(j1.id, other, 30) is None  # not the owner
    assert store.update_progress(j1.id, me, {"step": 3, "loss": 1.5})
    assert not store.update_progress(j1.id, other, {"step": 99})
    assert store.get(j1.id).progress == {"step": 3, "loss": 1.5}
    assert store.finish(j1.id, other, "failed", "x") is None
    done = store.finish(j1.id, me, "succeeded")
    assert done.status == "succeeded" and done.lease_owner is None and done.finished_at >= done.started_at
    assert store.finish(j1.id, me, "failed", "twice") is None  # finished jobs stay finished
    assert store.claim_next(other, 30, max_running=1).id == j2.id


def test_cancel_running_and_release(store: JobStore) -> None:
    job, _ = store.create_job(_job("a"))
    store.claim_next("o", 30, 1)
    flagged = store.request_cancel(job.id)
    assert flagged.status == "running" and flagged.cancel_requested
    assert store.heartbeat(job.id, "o", 30).cancel_requested
    assert not store.release(job.id, "o")  # a job asked to cancel is not requeued on shutdown
    job2, _ = store.create_job(_job("b"))
    store.finish(job.id, "o", "cancelled")
    store.claim_next("o", 30, 1)
    assert store.release(job2.id, "o")
    back = store.get(job2.id)
    assert back.status == "queued" and back.resume and back.attempts == 0 and back.lease_owner is None


def test_pause_and_resume(store: JobStore) -> None:
    queued, _ = store.create_job(_job("q"))
    assert store.request_pause(queued.id).status == "paused"  # queued: at once
    assert store.claim_next("o", 30, 1) is None  # a paused job is not claimed
    with pytest.raises(StoreConflict):  # it holds its adapter name
        store.create_job(_job("q"))
    assert store.resume(queued.id).status == "queued"
    running = store.claim_next("o", 30, 1)
    assert running.id == queued.id and running.attempts == 1
    flagged = store.request_pause(running.id)
    assert flagged.status == "running" and flagged.pause_requested
    assert store.heartbeat(running.id, "o", 30).pause_requested
    assert not store.resume(running.id).pause_requested  # withdrawn before the runner acted on it
    store.request_pause(running.id)
    assert store.release(running.id, "o")  # the trainer checkpointed and exited
    paused = store.get(running.id)
    assert paused.status == "paused" and paused.resume and not paused.pause_requested
    assert paused.attempts == 0 and paused.lease_owner is None  # not an attempt cut short; slot free
    assert store.request_cancel(paused.id).status == "cancelled"  # paused: cancelled at once
    assert store.request_pause(paused.id).status == "cancelled"  # an ended job stays ended
    # a runner that dies while a pause is under way leaves the job paused, not queued
    other, _ = store.create_job(_job("r"))
    store.claim_next("gone", 30, 1)
    store.request_pause(other.id)
    [(_, new)] = store.recover_stale(3, lambda o: o == "gone")
    assert new == "paused" and store.get(other.id).status == "paused"


def test_recover_stale_requeues_then_fails(store: JobStore) -> None:
    job, _ = store.create_job(_job("a"))
    alive = {"dead": False}

    def is_dead(owner):
        return alive["dead"]

    for attempt in (1, 2):
        got = store.claim_next(f"r{attempt}", 60, 1)
        assert got.attempts == attempt
        assert store.recover_stale(2, is_dead) == []  # lease fresh, owner alive: untouched
        alive["dead"] = True
        [(was, new)] = store.recover_stale(2, is_dead)
        alive["dead"] = False
        assert was.id == job.id
        if attempt == 1:
            assert new == "queued" and store.get(job.id).resume
        else:
            assert new == "failed"
    failed = store.get(job.id)
    assert failed.status == "failed" and "interrupted 2 times" in failed.error and failed.finished_at


def test_recover_expired_lease_and_cancel_requested(store: JobStore) -> None:
    job, _ = store.create_job(_job("a"))
    store.claim_next("gone", 0.05, 1)
    assert store.recover_stale(3, lambda o: False, skip_owner="gone") == []
    time.sleep(0.1)
    [(_, new)] = store.recover_stale(3, lambda o: False)  # expired lease alone is enough
    assert new == "queued"
    store.claim_next("gone", 0.05, 1)
    store.request_cancel(job.id)
    time.sleep(0.1)
    [(_, new)] = store.recover_stale(3, lambda o: False)
    assert new == "cancelled" and store.get(job.id).status == "cancelled"


def test_owner_liveness_on_this_host() -> None:
    assert not owner_is_dead(make_owner_id())
    code = "from service.jobs.lease import make_owner_id; print(make_owner_id())"
    owner = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert owner_is_dead(owner)  # that process has exited
    assert not owner_is_dead("some-other-host|1|1|x")  # unknown: only the lease's expiry decides
    assert owner_is_dead(None)


# --- several processes at once ---------------------------------------------------------------------


def _claimer(db: str, barrier, out: mp.Queue) -> None:
    store = JobStore(db)
    owner = make_owner_id()
    barrier.wait(timeout=60)  # all start together, so their transactions really interleave
    mine = []
    while (job := store.claim_next(owner, 60, max_running=1000)) is not None:
        mine.append(job.id)
        store.update_progress(job.id, owner, {"step": 1})
        assert store.finish(job.id, owner, "succeeded") is not None
    out.put(mine)


def _creator(db: str, adapter: str, key: str | None, barrier, out: mp.Queue) -> None:
    store = JobStore(db)
    barrier.wait(timeout=60)
    try:
        job, created = store.create_job(_job(adapter), key, "same-hash" if key else None)
        out.put((job.id, created))
    except StoreConflict as exc:
        out.put((None, exc.code))


def _run_all(target, args_list) -> list:
    out = CTX.Queue()
    procs = [CTX.Process(target=target, args=(*args, out)) for args in args_list]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


def test_concurrent_claims_take_each_job_exactly_once(location: str) -> None:
    db = location
    store = JobStore(db)
    ids = {store.create_job(_job(f"a{i}"))[0].id for i in range(60)}
    barrier = CTX.Barrier(4)
    results = _run_all(_claimer, [(str(db), barrier)] * 4)
    claimed = [j for r in results for j in r]
    assert sorted(claimed) == sorted(ids)  # none lost, none twice
    assert sum(1 for r in results if r) >= 2  # the claims did interleave
    assert store.counts()["succeeded"] == 60
    assert all(j.progress == {"step": 1} and j.attempts == 1 for j in store.list_jobs())


def test_concurrent_creates_one_job_per_key_and_adapter(location: str) -> None:
    db = location
    JobStore(db)
    same_key = _run_all(_creator, [(str(db), "k", "retry-1", CTX.Barrier(4))] * 4)
    assert len({job_id for job_id, _ in same_key}) == 1
    assert sorted(created for _, created in same_key) == [False, False, False, True]
    same_name = _run_all(_creator, [(str(db), "n", None, CTX.Barrier(4))] * 4)
    winners = [r for r in same_name if r[0] is not None]
    assert len(winners) == 1 and sorted(r[1] for r in same_name if r[0] is None) == ["adapter_busy"] * 3
    assert len(JobStore(db).list_jobs()) == 2


# --- schema versions and an unreachable database ---------------------------------------------------


def test_schema_is_versioned_and_a_newer_one_is_refused(location: str, store: JobStore) -> None:
    from service.jobs.sql import SCHEMA_VERSION

    job, _ = store.create_job(_job("a"))
    with store._read() as con:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert JobStore(location).get(job.id) == job  # reopening migrates nothing and loses nothing
    with store._write() as con:
        con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match="newer than this loraserve"):
        JobStore(location)


def test_sqlite_store_from_before_schema_versions_is_migrated(tmp_path: Path) -> None:
    """A store of the first release (no schema_version, no eval/warnings columns) keeps its jobs."""
    import sqlite3

    from service.jobs.sql import MIGRATIONS, SCHEMA_VERSION

    db = tmp_path / "jobs.sqlite3"
    con = sqlite3.connect(db)
    for stmt in MIGRATIONS[0]:
        con.execute(stmt)
    con.execute(
        "INSERT INTO jobs (id, adapter, status, created_at, updated_at) "
        "VALUES ('job-old', 'x', 'queued', 1, 1)"
    )
    con.commit()
    con.close()
    store = JobStore(db)
    old = store.get("job-old")
    assert old is not None and old.status == "queued" and old.warnings == [] and old.eval is None
    with store._read() as con:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert store.claim_next("o", 30, 1).id == "job-old"


def test_postgres_going_away_raises_store_unavailable_and_nothing_is_lost(postgres) -> None:
    from service.errors import error_body, job_error
    from service.jobs.model import StoreUnavailable

    store = JobStore(postgres.new_database())
    job, _ = store.create_job(_job("a"))
    store.claim_next("o", 60, 1)
    assert store.update_progress(job.id, "o", {"step": 2})
    postgres.stop("immediate")  # a crash: no checkpoint, connections cut
    try:
        with pytest.raises(StoreUnavailable) as err:
            store.heartbeat(job.id, "o", 60)
        answer = job_error(err.value)  # the domain error carries no HTTP; the one table maps it
        assert answer.status == 503 and answer.code == "job_store_unavailable"
        assert answer.headers["Retry-After"].isdigit()
        assert "127.0.0.1" in err.value.detail and postgres.password not in err.value.detail
        assert "127.0.0.1" not in error_body(503, err.value.code, err.value.message)["error"]["message"]
        with pytest.raises(StoreUnavailable):
            JobStore(store.location)  # opening (and migrating) waits for the database the same way
    finally:
        postgres.start()
    back = store.heartbeat(job.id, "o", 60)  # the same store object works again
    assert back is not None and back.status == "running" and back.progress == {"step": 2}
    assert store.finish(job.id, "o", "succeeded").status == "succeeded"
