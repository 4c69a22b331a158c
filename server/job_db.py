"""SQLite persistence of jobs and their log lines, so that jobs survive a server restart.

One connection guarded by a lock, WAL journal, schema versioned with ``PRAGMA user_version``.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from gradhub.proto.contract.errors import NotFoundError, ServerUnavailableError, StateError
from gradhub.proto.contract.states import JobState

__all__ = ["JOB_STATES", "SCHEMA_VERSION", "JobDB", "JobRecord", "MetricPoint"]

JOB_STATES = tuple(JobState)


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    """One job as stored; change it with ``JobDB.update`` (or ``dataclasses.replace`` locally)."""

    id: str
    name: str
    mode: str
    spec_json: str
    state: JobState
    reason: str = ""
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total_steps: int = 0
    version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    samples_per_second: float = 0.0
    working_dir: str | None = None
    attempts: int = 0
    owner: str = ""  # the user who submitted it (gradhub.server.auth); "" without a tokens file

    def __post_init__(self) -> None:
        _check_state(self.state)
        object.__setattr__(self, "state", JobState(self.state))


_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord))
_UPDATABLE = frozenset(_FIELDS) - {"id"}


def _migrate_to_1(conn: sqlite3.Connection) -> None:
    states = ", ".join(f"'{s}'" for s in JOB_STATES)
    conn.execute(f"""
        CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            mode TEXT NOT NULL,
            spec_json TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({states})),
            reason TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            step INTEGER NOT NULL DEFAULT 0,
            total_steps INTEGER NOT NULL DEFAULT 0,
            version INTEGER NOT NULL DEFAULT 0,
            metrics TEXT NOT NULL DEFAULT '{{}}',
            samples_per_second REAL NOT NULL DEFAULT 0,
            working_dir TEXT,
            attempts INTEGER NOT NULL DEFAULT 0
        )""")
    conn.execute("CREATE INDEX jobs_by_creation ON jobs (created_at, seq)")
    conn.execute("""
        CREATE TABLE job_logs (
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            line TEXT NOT NULL,
            PRIMARY KEY (job_id, seq)
        ) WITHOUT ROWID""")


def _migrate_to_2(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")


def _migrate_to_3(conn: sqlite3.Connection) -> None:
    conn.execute("""
        CREATE TABLE metric_points (
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            step INTEGER NOT NULL,
            kind TEXT NOT NULL,
            metrics TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (job_id, seq)
        ) WITHOUT ROWID""")


def _migrate_to_4(conn: sqlite3.Connection) -> None:
    """Sweeps and their trials (``gradhub.server.sweep_db``): a trial names its job, but outlives it
    (a deleted job's trial keeps its values and metrics)."""
    conn.execute("""
        CREATE TABLE sweeps (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            owner TEXT NOT NULL DEFAULT '',
            spec_json TEXT NOT NULL,
            seed INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
            reason TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            finished_at REAL,
            working_dir TEXT
        )""")
    conn.execute("""
        CREATE TABLE sweep_trials (
            sweep_id TEXT NOT NULL REFERENCES sweeps (id) ON DELETE CASCADE,
            number INTEGER NOT NULL,
            job_id TEXT NOT NULL DEFAULT '',
            state TEXT NOT NULL CHECK (state IN ('RUNNING', 'COMPLETE', 'PRUNED', 'FAILED')),
            params TEXT NOT NULL,
            internal TEXT NOT NULL,
            notes TEXT NOT NULL DEFAULT '{}',
            value REAL,
            intermediate TEXT NOT NULL DEFAULT '{}',
            metrics TEXT NOT NULL DEFAULT '{}',
            step INTEGER NOT NULL DEFAULT 0,
            reason TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            finished_at REAL,
            PRIMARY KEY (sweep_id, number)
        ) WITHOUT ROWID""")


# MIGRATIONS[i] brings a database from user_version i to i + 1.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_migrate_to_1, _migrate_to_2, _migrate_to_3,
                                                                _migrate_to_4)


@dataclass(frozen=True)
class MetricPoint:
    """One point of a job's curves: its metrics at a step, as a report brought them ("train":
    the job's loss, samples/s and learning rate; "eval": what the evaluation measured)."""

    seq: int
    step: int
    kind: str
    metrics: dict[str, float]
    at: float
SCHEMA_VERSION = len(MIGRATIONS)


class JobDB:
    """Jobs and job logs in one SQLite file; every method is safe to call from any thread.

    Unknown jobs raise ``NotFoundError``, a duplicate id or use after ``close()`` ``StateError``,
    unknown fields or states ``ValueError``. Commits survive a process crash (WAL with
    ``synchronous=NORMAL``; a power loss may drop the last few commits).
    """

    def __init__(self, path: Path | str) -> None:
        self._path = path
        self._lock = threading.Lock()
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            self._migrate(conn)
        except sqlite3.DatabaseError as e:  # not SQLite, truncated, or another program's schema
            conn.close()
            raise StateError(f"data_dir: {path} is not a readable gradhub job database ({e}); move it "
                             "aside to start with an empty one, or give the server another --data-dir") from e
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the connection; later calls raise ``StateError``. Closing twice is a no-op."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self._transaction(write=False) as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    # ----------------------------------------------------------------- jobs

    def insert(self, record: JobRecord) -> None:
        """Store a new job; ``StateError`` if a job with its id already exists."""
        row = _to_row(record)
        columns = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        with self._transaction() as conn:
            try:
                conn.execute(f"INSERT INTO jobs ({columns}) VALUES ({marks})", row)
            except sqlite3.IntegrityError as e:
                if _exists(conn, record.id):
                    raise StateError(f"job {record.id!r} already exists") from e
                raise

    def delete(self, job_id: str) -> None:
        """Remove a job and its log; ``NotFoundError`` if there is none."""
        with self._transaction() as conn:
            if not _exists(conn, job_id):
                raise _not_found(job_id)
            conn.execute("DELETE FROM job_logs WHERE job_id = ?", (job_id,))
            conn.execute("DELETE FROM metric_points WHERE job_id = ?", (job_id,))
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Set the given fields of a job and return the updated record. A change of ``state``
        must be an allowed transition from the stored one (``JobState.to``): ``StateError``."""
        unknown = sorted(set(fields) - _UPDATABLE)
        if unknown:
            raise ValueError(
                f"cannot update job field(s) {', '.join(unknown)}; "
                f"updatable fields: {', '.join(sorted(_UPDATABLE))}"
            )
        if "state" in fields:
            _check_state(fields["state"])
        row = _to_row_fields(fields)
        with self._transaction() as conn:
            if "state" in fields:
                current = _get(conn, job_id).state
                if current != fields["state"]:
                    current.to(fields["state"])
            if row:
                assignments = ", ".join(f"{c} = :{c}" for c in row)
                cur = conn.execute(
                    f"UPDATE jobs SET {assignments} WHERE id = :_job_id", {**row, "_job_id": job_id}
                )
                if cur.rowcount == 0:
                    raise _not_found(job_id)
            return _get(conn, job_id)

    def get(self, job_id: str) -> JobRecord:
        """The job with this id; ``NotFoundError`` if there is none."""
        with self._transaction(write=False) as conn:
            return _get(conn, job_id)

    def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state, 0 for none)."""
        with self._transaction(write=False) as conn:
            rows = conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        found = {JobState(state): int(n) for state, n in rows}
        return {state: found.get(state, 0) for state in JobState}

    def list(self, states: Iterable[str] | None = None) -> builtins.list[JobRecord]:
        """Jobs in creation order (ties in insertion order), optionally only those in ``states``."""
        query = f"SELECT {', '.join(_FIELDS)} FROM jobs"
        args: builtins.list[str] = []
        if states is not None:
            args = builtins.list(dict.fromkeys(states))
            for state in args:
                _check_state(state)
            if not args:
                return []
            query += f" WHERE state IN ({', '.join('?' for _ in args)})"
        with self._transaction(write=False) as conn:
            rows = conn.execute(query + " ORDER BY created_at, seq", args).fetchall()
        return [_from_row(r) for r in rows]

    def page(self, after: int, limit: int) -> tuple[builtins.list[JobRecord], int]:
        """Up to ``limit`` jobs inserted after the one numbered ``after`` (0: from the first), in
        insertion order, and the number of the last one returned (``after`` when none)."""
        query = f"SELECT seq, {', '.join(_FIELDS)} FROM jobs WHERE seq > ? ORDER BY seq LIMIT ?"
        with self._transaction(write=False) as conn:
            rows = conn.execute(query, (after, limit)).fetchall()
        return [_from_row(r[1:]) for r in rows], (rows[-1][0] if rows else after)

    # ----------------------------------------------------------------- logs

    def append_log(self, job_id: str, line: str) -> int:
        """Append a log line to a job and return its sequence number (1, 2, ...)."""
        with self._transaction() as conn:
            if not _exists(conn, job_id):
                raise _not_found(job_id)
            (last,) = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM job_logs WHERE job_id = ?", (job_id,)
            ).fetchone()
            conn.execute(
                "INSERT INTO job_logs (job_id, seq, line) VALUES (?, ?, ?)",
                (job_id, last + 1, line),
            )
            return int(last) + 1

    def add_point(self, job_id: str, step: int, kind: str, metrics: dict[str, float], at: float | None = None) -> int:
        """Append a point to a job's curves; returns its sequence number (1, 2, ...)."""
        with self._transaction() as conn:
            if not _exists(conn, job_id):
                raise _not_found(job_id)
            (last,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM metric_points WHERE job_id = ?",
                                   (job_id,)).fetchone()
            conn.execute("INSERT INTO metric_points (job_id, seq, step, kind, metrics, at) VALUES (?, ?, ?, ?, ?, ?)",
                         (job_id, last + 1, step, kind, json.dumps({str(k): float(v) for k, v in metrics.items()}),
                          time.time() if at is None else at))
            return int(last) + 1

    def points(self, job_id: str, after: int = 0, limit: int = 10_000) -> builtins.list[MetricPoint]:
        """A job's curve points with sequence number above ``after``, oldest first."""
        with self._transaction(write=False) as conn:
            if not _exists(conn, job_id):
                raise _not_found(job_id)
            rows = conn.execute("SELECT seq, step, kind, metrics, at FROM metric_points WHERE job_id = ? AND seq > ? "
                                "ORDER BY seq LIMIT ?", (job_id, after, limit)).fetchall()
        return [MetricPoint(int(seq), int(step), str(kind), json.loads(m), float(at)) for seq, step, kind, m, at in rows]

    def logs(
        self, job_id: str, after: int = 0, limit: int | None = None
    ) -> builtins.list[tuple[int, str]]:
        """A job's log lines with sequence number above ``after``, oldest first, at most ``limit``."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        with self._transaction(write=False) as conn:
            if not _exists(conn, job_id):
                raise _not_found(job_id)
            rows = conn.execute(
                "SELECT seq, line FROM job_logs WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after, -1 if limit is None else limit),
            ).fetchall()
        return [(int(seq), line) for seq, line in rows]

    # ----------------------------------------------------------------- internals

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        # (nested: the connection is read once the lock is held)
        with self._lock, transaction(self._conn, f"job database {str(self._path)!r}", write) as conn:
            yield conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        (current,) = conn.execute("PRAGMA user_version").fetchone()
        if current > SCHEMA_VERSION:
            raise StateError(
                f"job database {str(self._path)!r} has schema version {current}, newer than "
                f"this gradhub supports ({SCHEMA_VERSION}); upgrade gradhub"
            )
        for version in range(current, SCHEMA_VERSION):
            conn.execute("BEGIN IMMEDIATE")
            try:
                MIGRATIONS[version](conn)
                conn.execute(f"PRAGMA user_version = {version + 1}")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")


@contextmanager
def transaction(conn: sqlite3.Connection | None, name: str, write: bool = True) -> Iterator[sqlite3.Connection]:
    """One transaction on ``conn`` (the caller holds its lock), committed unless the body raises.
    A read (``write=False``) takes no database lock (WAL: it reads a snapshot even while another
    process writes). A database that another process keeps locked past the busy timeout raises
    ServerUnavailableError (a retryable, one-line error) instead of sqlite's own; a closed one
    (``conn`` None) StateError."""
    if conn is None:
        raise StateError(f"{name} is closed")
    try:
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.OperationalError as e:
        if "locked" not in str(e) and "busy" not in str(e):
            raise
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise ServerUnavailableError(f"database: {name} is locked by another process ({e}); try again") from e


def _check_state(state: object) -> None:
    if state not in JOB_STATES:
        raise ValueError(f"job state must be one of {', '.join(JOB_STATES)}, got {state!r}")


def _not_found(job_id: str) -> NotFoundError:
    return NotFoundError(f"job {job_id!r} not found")


def _exists(conn: sqlite3.Connection, job_id: str) -> bool:
    return conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None


def _get(conn: sqlite3.Connection, job_id: str) -> JobRecord:
    row = conn.execute(f"SELECT {', '.join(_FIELDS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise _not_found(job_id)
    return _from_row(row)


def _to_row_fields(fields: dict[str, Any]) -> dict[str, Any]:
    row = dict(fields)
    if "state" in row:
        row["state"] = str(row["state"])  # the enum's value, as the CHECK constraint lists it
    if "metrics" in row:
        row["metrics"] = json.dumps({str(k): float(v) for k, v in row["metrics"].items()})
    return row


def _to_row(record: JobRecord) -> dict[str, Any]:
    return _to_row_fields({name: getattr(record, name) for name in _FIELDS})


def _from_row(row: tuple[Any, ...]) -> JobRecord:
    values = dict(zip(_FIELDS, row, strict=True))
    values["metrics"] = json.loads(values["metrics"])
    return JobRecord(**values)
