"""Where allreduce groups meet: one torch.distributed TCPStore on the server's host, started
with the first group that needs it. Every group gets its own key prefix (job and generation),
so a group that re-forms after a loss never reads the keys of the one before."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

STORE_TIMEOUT_S = 120.0


class RendezvousStore:
    """The TCPStore (listening on a free port) that workers reach at the server's address."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._store: Any = None

    def port(self) -> int:
        with self._lock:
            if self._store is None:
                import torch.distributed as dist

                self._store = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False,
                                            timeout=timedelta(seconds=STORE_TIMEOUT_S))
            return int(self._store.port)

    @staticmethod
    def prefix(job_id: str, generation: int) -> str:
        return f"{job_id}/{generation}/"

    def close(self) -> None:
        with self._lock:
            self._store = None  # the store's server thread ends with the object
