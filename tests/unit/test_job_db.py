"""Unit tests of JobDB: records, ordering, logs, persistence across reopen, threads, errors."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gradhub.proto.contract.errors import NotFoundError, StateError
from gradhub.server.job_db import SCHEMA_VERSION, JobDB, JobRecord


def _job(job_id: str, created_at: float = 100.0, **kw) -> JobRecord:
    return JobRecord(
        id=job_id, name=f"name-{job_id}", mode="sync", spec_json='{"steps": 10}',
        state="QUEUED", created_at=created_at, **kw,
    )  # fmt: skip


@pytest.fixture
def db(tmp_path: Path):
    with JobDB(tmp_path / "jobs.db") as db:
        yield db


def test_insert_get_round_trip(db: JobDB) -> None:
    full = _job(
        "a", reason="r", started_at=101.5, finished_at=None, step=3, total_steps=10, version=4,
        metrics={"loss": 0.25, "acc": 1.0}, samples_per_second=12.5, working_dir="/tmp/w",
        attempts=2,
    )  # fmt: skip
    db.insert(full)
    assert db.get("a") == full
    db.insert(_job("b"))
    assert db.get("b") == _job("b")


def test_defaults(db: JobDB) -> None:
    rec = JobRecord(id="x", name="n", mode="async", spec_json="{}", state="QUEUED")
    assert rec.metrics == {} and rec.attempts == 0 and rec.created_at > 0
    db.insert(rec)
    assert db.get("x") == rec


def test_update_returns_new_record(db: JobDB) -> None:
    db.insert(_job("a"))
    rec = db.update("a", state="RUNNING", started_at=200.0, step=5, metrics={"loss": 0.5})
    assert rec == dataclasses.replace(
        _job("a"), state="RUNNING", started_at=200.0, step=5, metrics={"loss": 0.5}
    )
    assert db.get("a") == rec
    assert db.update("a") == rec  # nothing to change
    rec = db.update("a", working_dir=None, reason="preempted", attempts=1)
    assert (rec.working_dir, rec.reason, rec.attempts) == (None, "preempted", 1)


def test_update_errors(db: JobDB) -> None:
    db.insert(_job("a"))
    with pytest.raises(ValueError, match="bogus"):
        db.update("a", bogus=1)
    with pytest.raises(ValueError, match="id"):
        db.update("a", id="b")
    with pytest.raises(ValueError, match="state"):
        db.update("a", state="EXPLODED")
    with pytest.raises(NotFoundError, match="job 'ghost' not found"):
        db.update("ghost", step=1)
    with pytest.raises(NotFoundError):
        db.update("ghost")
    assert db.get("a") == _job("a")  # nothing half-applied


def test_get_unknown_and_duplicate_insert(db: JobDB) -> None:
    with pytest.raises(NotFoundError) as err:
        db.get("x")
    assert str(err.value) == "job 'x' not found"
    db.insert(_job("x"))
    with pytest.raises(StateError, match="already exists"):
        db.insert(_job("x"))


def test_invalid_state_in_record() -> None:
    with pytest.raises(ValueError, match="state"):
        JobRecord(id="a", name="n", mode="m", spec_json="{}", state="queued")


def test_list_in_creation_order_with_ties_by_insertion(db: JobDB) -> None:
    db.insert(_job("late", created_at=300.0))
    db.insert(_job("tie-2", created_at=200.0))
    db.insert(_job("early", created_at=100.0))
    db.insert(_job("tie-1", created_at=200.0))
    assert [j.id for j in db.list()] == ["early", "tie-2", "tie-1", "late"]
    db.update("tie-2", state="RUNNING")
    db.update("late", state="FAILED", reason="boom")
    assert [j.id for j in db.list(["RUNNING", "FAILED"])] == ["tie-2", "late"]
    assert [j.id for j in db.list(iter(["QUEUED"]))] == ["early", "tie-1"]
    assert db.list([]) == []
    assert db.list(["SUCCEEDED"]) == []
    with pytest.raises(ValueError, match="state"):
        db.list(["DONE"])


def test_logs_sequence_and_paging(db: JobDB) -> None:
    db.insert(_job("a"))
    db.insert(_job("b"))
    assert [db.append_log("a", f"line {i}") for i in range(1, 6)] == [1, 2, 3, 4, 5]
    assert db.append_log("b", "other") == 1
    assert db.logs("a") == [(i, f"line {i}") for i in range(1, 6)]
    assert db.logs("a", after=3) == [(4, "line 4"), (5, "line 5")]
    assert db.logs("a", after=1, limit=2) == [(2, "line 2"), (3, "line 3")]
    assert db.logs("a", after=5) == [] and db.logs("a", limit=0) == []
    assert db.logs("b") == [(1, "other")]
    with pytest.raises(NotFoundError):
        db.append_log("ghost", "x")
    with pytest.raises(NotFoundError):
        db.logs("ghost")


def test_persistence_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with JobDB(path) as db:
        db.insert(_job("a", metrics={"loss": 1.5}))
        db.update("a", state="RUNNING")  # jobs only succeed from RUNNING
        db.update("a", state="SUCCEEDED", finished_at=500.0, step=10)
        db.append_log("a", "hello")
        db.append_log("a", "bye")
        expected = db.get("a")
    with pytest.raises(StateError, match="closed"):
        db.get("a")
    db.close()  # twice is fine

    with JobDB(path) as db:
        assert db.schema_version == SCHEMA_VERSION == 4
        assert db.get("a") == expected
        assert db.logs("a") == [(1, "hello"), (2, "bye")]
        assert db.append_log("a", "again") == 3
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_a_database_of_the_first_schema_is_migrated_and_its_jobs_have_no_owner(tmp_path: Path) -> None:
    from gradhub.server.job_db import MIGRATIONS

    path = tmp_path / "v1.db"
    conn = sqlite3.connect(str(path), isolation_level=None)
    MIGRATIONS[0](conn)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO jobs (id, name, mode, spec_json, state, created_at) "
                 "VALUES ('j-old', 'old', 'ps-sync', '{}', 'SUCCEEDED', 1.0)")
    conn.close()
    with JobDB(path) as db:
        assert db.schema_version == SCHEMA_VERSION
        assert db.get("j-old").owner == ""
        db.insert(JobRecord(id="j-new", name="new", mode="ps-sync", spec_json="{}", state="QUEUED", owner="alice"))
        assert db.get("j-new").owner == "alice"


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    JobDB(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StateError, match="schema version 99"):
        JobDB(path)


def test_concurrent_updates_and_logs_stay_consistent(db: JobDB) -> None:
    n_threads, n_ops = 8, 40
    for t in range(n_threads):
        db.insert(_job(f"job-{t}"))
    db.insert(_job("shared"))
    barrier = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        barrier.wait(timeout=30)
        for i in range(n_ops):
            rec = db.update(f"job-{t}", step=i, metrics={"loss": float(i)}, version=i)
            assert (rec.step, rec.version, rec.metrics) == (i, i, {"loss": float(i)})
            db.update("shared", step=t * 1000 + i, total_steps=t * 1000 + i)
            db.append_log("shared", f"{t}:{i}")
            shared = db.get("shared")
            assert shared.step == shared.total_steps  # never half an update

    with ThreadPoolExecutor(n_threads) as pool:
        for future in [pool.submit(worker, t) for t in range(n_threads)]:
            future.result()  # re-raises a worker's error
    for t in range(n_threads):
        assert db.get(f"job-{t}").step == n_ops - 1
    logs = db.logs("shared")
    assert [seq for seq, _ in logs] == list(range(1, n_threads * n_ops + 1))
    assert sorted(line for _, line in logs) == sorted(
        f"{t}:{i}" for t in range(n_threads) for i in range(n_ops)
    )
    for t in range(n_threads):  # each thread's lines appear in its own order
        mine = [int(line.split(":")[1]) for _, line in logs if line.startswith(f"{t}:")]
        assert mine == list(range(n_ops))


def test_a_corrupt_database_is_a_state_error_that_says_what_to_do(tmp_path) -> None:
    path = tmp_path / "jobs.db"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StateError, match=r"jobs.db is not a readable gradhub job database .*move it aside"):
        JobDB(path)


def test_reads_go_on_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    with JobDB(tmp_path / "jobs.db") as db:
        db.insert(JobRecord(id="a", name="a", mode="ps-sync", spec_json="{}", state="QUEUED"))
        holder = sqlite3.connect(str(tmp_path / "jobs.db"), isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            assert db.get("a").name == "a"
            assert [r.id for r in db.list()] == ["a"]
            assert db.page(0, 10)[0][0].id == "a"
            assert db.logs("a") == []
        finally:
            holder.execute("COMMIT")
            holder.close()
