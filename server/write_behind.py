"""Database writes that a worker's call must not wait for (its metrics, its job's progress), done
by one thread of their own. A keyed write replaces the one still pending under its key (only
the latest metrics matter); the others run in order. A write that fails on a busy or locked
database is tried again until it succeeds or the writer stops, so that another process holding
the SQLite lock delays the job's record, never its training.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from gradhub.proto.contract.errors import ServerUnavailableError

log = logging.getLogger(__name__)
RETRY_S = 0.5  # after a write that found the database locked


class WriteBehind:
    """``put(key, write)`` queues ``write()``; ``flush()`` waits until every write queued before
    it is done; ``start()``/``stop(grace)`` (which flushes first) bound its thread's life."""

    def __init__(self, name: str = "gradhub-db-writer") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._pending: OrderedDict[Hashable, Callable[[], object]] = OrderedDict()
        self._queued = self._done = 0  # writes ever queued / finished (a keyed one that replaces counts once)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._serial = 0

    def start(self) -> WriteBehind:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def put(self, key: Hashable | None, write: Callable[[], object]) -> None:
        """Queue ``write``; under ``key`` it replaces a write still pending there (None: no key).
        Before ``start()`` (a manager used without its threads, in tests) it runs here and now."""
        if self._thread is None:
            write()
            return
        with self._cond:
            if key is None:
                self._serial += 1
                key = ("_unkeyed", self._serial)
            if key in self._pending:
                self._pending[key] = write  # the newer one, in the older one's place
            else:
                self._pending[key] = write
                self._queued += 1
            self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the writes queued so far are done; False when ``timeout`` ran out first."""
        with self._cond:
            target = self._queued
            if self._thread is None:
                return True
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def stop(self, grace: float = 10.0) -> None:
        if not self.flush(grace):
            log.warning("database: %d writes still pending at shutdown (the database is busy); they are lost",
                        len(self._pending))
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(grace)
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stopping)
                if self._stopping and not self._pending:
                    return
                key, write = next(iter(self._pending.items()))
            try:
                write()
            except (sqlite3.OperationalError, ServerUnavailableError) as e:  # locked or busy: again, soon
                log.warning("database: a write is delayed (%s); trying again", e)
                with self._cond:
                    if self._stopping:
                        return
                    self._cond.wait(RETRY_S)
                continue
            except Exception:
                log.exception("database: a write failed; it is dropped")
            with self._cond:
                if self._pending.get(key) is write:
                    del self._pending[key]
                    self._done += 1
                # else: replaced while it ran; the newer write is still pending under the key
                self._cond.notify_all()
