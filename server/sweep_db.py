"""SQLite persistence of sweeps and their trials, in the job database's file (its schema 4
creates the tables: ``gradhub.server.job_db``), through a connection of its own.

Every state change is checked against the tables of ``gradhub.proto.contract.sweep``. A trial
keeps its values, its evaluations and its job's final metrics, so that the sweep's study can be
rebuilt after a restart and its leaderboard read even after the trial's job was deleted.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gradhub.proto.contract.errors import NotFoundError, StateError
from gradhub.proto.contract.sweep import SweepState, TrialState
from gradhub.server.job_db import transaction

__all__ = ["SweepDB", "SweepRecord", "TrialRecord"]

SWEEPS_SCHEMA = 4  # the job database's version that has the sweep tables


@dataclass(frozen=True, kw_only=True)
class SweepRecord:
    id: str
    name: str
    spec_json: str
    seed: int
    state: SweepState = SweepState.RUNNING
    owner: str = ""
    reason: str = ""
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    working_dir: str | None = None  # the packed working_dir every trial gets (a zip), if any

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", SweepState(self.state))


@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    sweep_id: str
    number: int
    params: dict[str, Any]  # the job's values of the space
    internal: dict[str, Any]  # Optuna's (a choice's index)
    state: TrialState = TrialState.RUNNING
    job_id: str = ""  # "" until its job is submitted
    notes: dict[str, Any] = field(default_factory=dict)  # the study's system attributes (a grid's point)
    value: float | None = None  # the objective: the final one, or a pruned trial's last evaluation
    intermediate: dict[int, float] = field(default_factory=dict)  # the objective at each evaluation's step
    metrics: dict[str, float] = field(default_factory=dict)  # the job's metrics when it ended
    step: int = 0  # the job's step when it ended (a pruned trial's: where it was stopped)
    reason: str = ""
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", TrialState(self.state))


_SWEEP_FIELDS = tuple(f.name for f in fields(SweepRecord))
_TRIAL_FIELDS = tuple(f.name for f in fields(TrialRecord))
_JSON = frozenset({"params", "internal", "notes", "intermediate", "metrics"})


class SweepDB:
    """Sweeps and trials; every method is safe to call from any thread. Unknown sweeps raise
    ``NotFoundError``; a transition the state tables do not allow, ``StateError``."""

    def __init__(self, path: Path | str) -> None:
        self._path = path
        self._lock = threading.Lock()
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version < SWEEPS_SCHEMA:
            conn.close()
            raise StateError(f"data_dir: {path} has schema {version}; open it with JobDB first (it migrates "
                             f"to {SWEEPS_SCHEMA}, which holds the sweeps)")
        self._conn: sqlite3.Connection | None = conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ----------------------------------------------------------------- sweeps
    def insert_sweep(self, rec: SweepRecord) -> None:
        row = {k: getattr(rec, k) for k in _SWEEP_FIELDS}
        row["state"] = str(rec.state)
        with self._transaction() as conn:
            conn.execute(f"INSERT INTO sweeps ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})", row)

    def update_sweep(self, sweep_id: str, **changes: Any) -> SweepRecord:
        unknown = set(changes) - set(_SWEEP_FIELDS) | ({"id"} & set(changes))
        if unknown:
            raise ValueError(f"cannot update sweep field(s) {', '.join(sorted(unknown))}")
        with self._transaction() as conn:
            current = _sweep(conn, sweep_id)
            if "state" in changes and changes["state"] != current.state:
                current.state.to(changes["state"])
                changes["state"] = str(changes["state"])
            conn.execute(f"UPDATE sweeps SET {', '.join(f'{k} = :{k}' for k in changes)} WHERE id = :_id",
                         {**changes, "_id": sweep_id})
            return _sweep(conn, sweep_id)

    def delete_sweep(self, sweep_id: str) -> None:
        """Remove a sweep and its trials (not their jobs)."""
        with self._transaction() as conn:
            _sweep(conn, sweep_id)
            conn.execute("DELETE FROM sweeps WHERE id = ?", (sweep_id,))

    def get_sweep(self, sweep_id: str) -> SweepRecord:
        with self._transaction(write=False) as conn:
            return _sweep(conn, sweep_id)

    def sweeps(self, states: Iterable[SweepState] | None = None) -> builtins.list[SweepRecord]:
        """Sweeps in creation order, optionally only those in ``states``."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(f"SELECT {', '.join(_SWEEP_FIELDS)} FROM sweeps ORDER BY seq").fetchall()
        out = [SweepRecord(**dict(zip(_SWEEP_FIELDS, r, strict=True))) for r in rows]
        wanted = None if states is None else set(states)
        return [r for r in out if wanted is None or r.state in wanted]

    # ----------------------------------------------------------------- trials
    def add_trial(self, rec: TrialRecord) -> None:
        row = _trial_row({k: getattr(rec, k) for k in _TRIAL_FIELDS})
        with self._transaction() as conn:
            _sweep(conn, rec.sweep_id)
            conn.execute(f"INSERT INTO sweep_trials ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})",
                         row)

    def update_trial(self, sweep_id: str, number: int, **changes: Any) -> TrialRecord:
        unknown = set(changes) - set(_TRIAL_FIELDS) | ({"sweep_id", "number"} & set(changes))
        if unknown:
            raise ValueError(f"cannot update trial field(s) {', '.join(sorted(unknown))}")
        with self._transaction() as conn:
            current = _trial(conn, sweep_id, number)
            if "state" in changes and changes["state"] != current.state:
                current.state.to(changes["state"])
            row = _trial_row(changes)
            conn.execute(f"UPDATE sweep_trials SET {', '.join(f'{k} = :{k}' for k in row)} "
                         "WHERE sweep_id = :_s AND number = :_n", {**row, "_s": sweep_id, "_n": number})
            return _trial(conn, sweep_id, number)

    def trials(self, sweep_id: str) -> builtins.list[TrialRecord]:
        """The sweep's trials by number; ``NotFoundError`` for an unknown sweep."""
        with self._transaction(write=False) as conn:
            _sweep(conn, sweep_id)
            rows = conn.execute(f"SELECT {', '.join(_TRIAL_FIELDS)} FROM sweep_trials WHERE sweep_id = ? "
                                "ORDER BY number", (sweep_id,)).fetchall()
        return [_trial_from(r) for r in rows]

    # ----------------------------------------------------------------- internals
    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """As ``JobDB._transaction``."""
        # (nested: the connection is read once the lock is held)
        with self._lock, transaction(self._conn, f"sweep database {str(self._path)!r}", write) as conn:
            yield conn


def _sweep(conn: sqlite3.Connection, sweep_id: str) -> SweepRecord:
    row = conn.execute(f"SELECT {', '.join(_SWEEP_FIELDS)} FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"sweep {sweep_id!r} not found")
    return SweepRecord(**dict(zip(_SWEEP_FIELDS, row, strict=True)))


def _trial(conn: sqlite3.Connection, sweep_id: str, number: int) -> TrialRecord:
    row = conn.execute(f"SELECT {', '.join(_TRIAL_FIELDS)} FROM sweep_trials WHERE sweep_id = ? AND number = ?",
                       (sweep_id, number)).fetchone()
    if row is None:
        raise NotFoundError(f"sweep {sweep_id!r} has no trial {number}")
    return _trial_from(row)


def _trial_row(values: dict[str, Any]) -> dict[str, Any]:
    row = dict(values)
    for k in _JSON & set(row):
        row[k] = json.dumps({str(s): v for s, v in row[k].items()} if k == "intermediate" else row[k],
                            sort_keys=True)
    if "state" in row:
        row["state"] = str(row["state"])
    return row


def _trial_from(row: tuple[Any, ...]) -> TrialRecord:
    values = dict(zip(_TRIAL_FIELDS, row, strict=True))
    for k in _JSON:
        values[k] = json.loads(values[k])
    values["intermediate"] = {int(s): float(v) for s, v in values["intermediate"].items()}
    return TrialRecord(**values)
