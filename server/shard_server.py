"""One parameter-server shard (``ps_shards: K``, shards 1 to K; the server keeps the job's
control store): a ``ParameterStore`` over its slice of the parameters, served on a data plane
of its own, which workers reach directly. No Ray in here (``gradhub.server.shard_actors`` runs
it in a Ray actor).

The job's control plane stays on the gRPC server: it registers each worker here too (with the
credential it issued), collects the shard's checkpoints of a step (``capture``) and its
figures (``stats``).
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from gradhub.proto.contract.errors import NotFoundError
from gradhub.server.data_plane import DataPlane
from gradhub.server.flat_optimizer import load_optimizer_machinery
from gradhub.server.store import CheckpointState, ParameterStore, StoreConfig
from gradhub.server.tls import server_context

STORE_THREADS = 4


@dataclass(frozen=True)
class ShardStats:
    """What ``gradhub status`` shows of a shard."""

    index: int
    host: str
    first: int  # its slice of the flat parameters: [first, end)
    end: int
    version: int
    bytes_in: int
    bytes_out: int
    updates_per_s: float
    pid: int = 0


def store_stats(index: int, host: str, store: ParameterStore, rate: float) -> ShardStats:
    shard = store.shard
    workers = store.workers()
    return ShardStats(index, host, shard.lo if shard else 0, shard.hi if shard else 0, store.version,
                      sum(w.bytes_in for w in workers), sum(w.bytes_out for w in workers), rate, os.getpid())


class UpdateRate:
    """Updates per second of a store, between two readings."""

    def __init__(self) -> None:
        self._at, self._version, self.rate = time.monotonic(), 0, 0.0

    def read(self, version: int) -> float:
        now = time.monotonic()
        if now - self._at >= 0.5:
            self.rate = max(0, version - self._version) / (now - self._at)
            self._at, self._version = now, version
        return self.rate


class ShardServer:
    """Shard ``config.shard`` of job ``config.job_id``: its store and its data plane on
    ``host`` (this node's address; any free port). ``start()``, then serve until ``stop()``."""

    def __init__(self, config: StoreConfig, host: str, *, max_model_bytes: int,
                 tls: tuple[bytes, bytes] | None = None) -> None:
        """``tls``: the server's certificate chain and key (PEM): the shard's TCP port speaks
        TLS with them, and workers check it as they check the server (by the server's name)."""
        self.config, self.host = config, host
        self.store_ = ParameterStore(config, on_checkpoint=self._captured)
        self._lock = threading.Lock()
        self._captures: dict[int, CheckpointState] = {}
        self._pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix=f"gradhub-shard{config.shard}")
        self._plane = DataPlane(self, host, 0, max_model_bytes=max_model_bytes, pool=self._pool,
                                tls=None if tls is None else tls_context(*tls))
        self._rate = UpdateRate()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> Self:
        load_optimizer_machinery()  # before the data plane's threads start (its docstring)
        self._plane.start()
        return self

    def stop(self, grace: float = 2.0) -> None:
        self.store_.close("the job's shard stopped")
        self._plane.stop(grace)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def endpoint(self) -> dict[str, object]:
        """Where workers connect (a ``DataEndpoint`` without the credential, as plain values)."""
        e = self._plane.endpoint("", self.host)
        return {"tcp_host": e.tcp_host, "tcp_port": e.tcp_port, "unix_path": e.unix_path, "host_id": e.host_id,
                "tls": e.tls, "shared_memory": e.shared_memory}

    # ---------------------------------------------------------------- the data plane's
    def store(self, job_id: str) -> ParameterStore:
        if job_id != self.config.job_id:
            raise NotFoundError(f"job_id: job {job_id!r} has no shard here")
        return self.store_

    # ---------------------------------------------------------------- the control plane's
    def register(self, rank: int, host: str, pid: int, credential: str, total_steps: int,
                 at_least: int | None = None) -> tuple[int, int, bool]:
        """Worker ``rank`` registered with the job's server, which issued ``credential``
        (``at_least``: ``ParameterStore.register``'s)."""
        if self.store_.total_steps is None:
            self.store_.set_total_steps(total_steps)
        return self.store_.register(rank, host, pid, credential, at_least)

    def follow(self, size: int, clocks: Sequence[int], at_once: bool) -> int:
        """An elastic job's size changed on the control store (``ParameterStore.follow``)."""
        return self.store_.follow(size, clocks, at_once)

    def resume_from(self, state: CheckpointState, total_steps: int) -> None:
        self.store_.resume_from(state, total_steps)

    def capture(self, step: int) -> CheckpointState | None:
        """The shard's state at the checkpoint of ``step``, once it got there (None: not yet;
        asked again until every shard has its own); older ones are dropped."""
        with self._lock:
            for old in [s for s in self._captures if s < step]:
                del self._captures[old]
            return self._captures.get(step)

    def checkpoint_state(self) -> CheckpointState:
        return self.store_.checkpoint_state()

    def stats(self) -> ShardStats:
        return store_stats(self.config.shard, self.host, self.store_, self._rate.read(self.store_.version))

    def mark_dead(self, rank: int) -> None:
        self.store_.mark_dead(rank)

    def clip_held(self) -> int | None:
        return self.store_.clip_held()

    def clip_part(self, step: int) -> float | None:
        return self.store_.clip_part(step)

    def clip_total(self, step: int, total_sq: float) -> None:
        self.store_.clip_total(step, total_sq)

    def close(self, reason: str) -> None:
        self.store_.close(reason)

    def _captured(self, state: CheckpointState) -> None:
        with self._lock:
            self._captures[state.step] = state



def tls_context(chain: bytes, key: bytes) -> ssl.SSLContext:
    """A server-side TLS context from PEM bytes (``ssl`` loads files: they live in a private
    temporary folder for the moment it reads them)."""
    folder = tempfile.mkdtemp(prefix="gradhub-shard-tls-")  # mode 0700: this user only
    try:
        cert, private = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert.write_bytes(chain)
        private.touch(mode=0o600)
        private.write_bytes(key)
        return server_context(cert, private)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
