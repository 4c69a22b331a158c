"""Where allreduce groups meet: one torch.distributed TCPStore on the server's host, started
with the first group that needs it, listening where the gRPC server listens (a server bound to
loopback keeps its store on loopback). Every group gets its own key prefix (job and
generation), so a group that re-forms after a loss never reads the keys of the one before."""

from __future__ import annotations

import socket
import threading
from datetime import timedelta
from typing import Any

STORE_TIMEOUT_S = 120.0


class RendezvousStore:
    """The TCPStore (on a free port of ``host``, the server's bind address) that workers reach at
    the server's address."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host.strip("[]")
        self._lock = threading.Lock()
        self._store: Any = None

    def port(self) -> int:
        with self._lock:
            if self._store is None:
                import torch.distributed as dist

                sock = _listen(self._host)
                try:
                    self._store = dist.TCPStore(self._host or "0.0.0.0", sock.getsockname()[1], is_master=True,
                                                wait_for_workers=False, timeout=timedelta(seconds=STORE_TIMEOUT_S),
                                                master_listen_fd=sock.fileno(), use_libuv=True)
                except BaseException:
                    sock.close()
                    raise
                sock.detach()  # the store owns the socket now, and closes it with itself
            return int(self._store.port)

    @staticmethod
    def prefix(job_id: str, generation: int) -> str:
        return f"{job_id}/{generation}/"

    def close(self) -> None:
        with self._lock:
            self._store = None  # the store's server thread and socket end with the object


def _listen(host: str) -> socket.socket:
    """A listening TCP socket on a free port of ``host`` ("0.0.0.0" or "::": every interface)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 clients too
        sock.bind((host or "0.0.0.0", 0))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock
