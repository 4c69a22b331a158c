"""One server per data dir: the server holds an exclusive lock on ``<data dir>/server.lock`` for
its whole life (the OS releases it when the process ends, however it ends), and the file says
who holds it, so a second server refuses to start with a line that names the first."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from gradhub.proto.contract.errors import StateError

LOCK_NAME = "server.lock"


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, address: str = "") -> None:
        """Take the lock, or raise StateError naming the server that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise StateError(f"data_dir: {self.path.parent} is in use by {holder}; stop that server or "
                             "give this one another --data-dir") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.note(address)

    def note(self, address: str) -> None:
        """Record who holds the lock (this process, and where it listens)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "address": address,
                                        "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        where = f" at {h['address']}" if h.get("address") else ""
        return f"the gradhub server pid {h['pid']} on {h['host']}{where} (since {h['since']})"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "another gradhub server"
