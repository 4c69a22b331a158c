"""The manager's write-behind (``gradhub.server.write_behind``): keyed writes coalesce to the
latest, unkeyed ones run in order, a write that finds the database locked is tried again, and
``flush`` waits for what was queued before it."""

from __future__ import annotations

import sqlite3
import threading

from gradhub.server.write_behind import WriteBehind


def test_writes_run_in_order_and_a_keyed_one_keeps_only_the_latest():
    done: list[str] = []
    gate = threading.Event()
    writer = WriteBehind().start()
    try:
        writer.put(None, lambda: (gate.wait(10), done.append("first")))  # holds the thread
        for i in range(5):
            writer.put("metrics", lambda i=i: done.append(f"metrics {i}"))
        writer.put(None, lambda: done.append("log"))
        gate.set()
        assert writer.flush(10)
        assert done == ["first", "metrics 4", "log"]
    finally:
        writer.stop(5)


def test_a_write_that_finds_the_database_locked_is_tried_again(tmp_path):
    path = tmp_path / "db.sqlite"
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE t (v INTEGER)")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the lock
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0.05)
    tries = []

    def write() -> None:
        tries.append(1)
        if len(tries) == 2:
            holder.execute("COMMIT")  # the other process lets go after the first retry
        conn.execute("INSERT INTO t VALUES (1)")

    writer = WriteBehind().start()
    try:
        writer.put("k", write)
        assert writer.flush(10), "the write went through once the lock was free"
        assert len(tries) >= 2
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
    finally:
        writer.stop(5)
        conn.close()
        holder.close()
        setup.close()


def test_before_start_a_write_runs_at_once():
    done = []
    writer = WriteBehind()
    writer.put("k", lambda: done.append(1))
    assert done == [1] and writer.flush(0)
