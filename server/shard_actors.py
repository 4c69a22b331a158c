"""Ray adapter: a sharded job's shards 1 to K, each a ``ShardServer`` in a Ray actor of its own
(the server keeps the job's control store, ``gradhub.server.shard_set``). They go to the
cluster's nodes one each in turn, the server's node last (its process serves the control
plane). The actors hold no CPU of the queue's: a shard's work is the parameter server's, like
the server process's own."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from gradhub.server.shard_server import ShardServer, ShardStats
from gradhub.server.store import CheckpointState, StoreConfig

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # a new actor process imports torch and gradhub
CALL_TIMEOUT_S = 60.0


class ShardActor:
    """The actor: one ``ShardServer`` on this node's address. A threaded actor (its calls may
    run at once; the server's state has its locks): ``serve`` returns only once it is stopped,
    so its result tells the controller whether the process died."""

    def __init__(self, config: StoreConfig, max_model_bytes: int, tls: tuple[bytes, bytes] | None = None) -> None:
        import ray

        node = ray.get_runtime_context().get_node_id()
        # the address Ray knows this node by (the node's own, which a worker on another host reaches)
        address = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node),
                       ray.util.get_node_ip_address())
        self._server = ShardServer(config, address, max_model_bytes=max_model_bytes, tls=tls).start()
        self._stopped = threading.Event()

    def serve(self) -> None:
        self._stopped.wait()

    def endpoint(self) -> dict[str, object]:
        return self._server.endpoint()

    def register(self, rank: int, host: str, pid: int, credential: str, total_steps: int,
                 at_least: int | None = None) -> int:
        return self._server.register(rank, host, pid, credential, total_steps, at_least)[1]

    def follow(self, size: int, clocks: Sequence[int], at_once: bool) -> int:
        return self._server.follow(size, clocks, at_once)

    def resume_from(self, state: CheckpointState, total_steps: int) -> None:
        self._server.resume_from(state, total_steps)

    def capture(self, step: int) -> CheckpointState | None:
        return self._server.capture(step)

    def checkpoint_state(self) -> CheckpointState:
        return self._server.checkpoint_state()

    def stats(self) -> ShardStats:
        return self._server.stats()

    def mark_dead(self, rank: int) -> None:
        self._server.mark_dead(rank)

    def clip_held(self) -> int | None:
        return self._server.clip_held()

    def clip_part(self, step: int) -> float | None:
        return self._server.clip_part(step)

    def clip_total(self, step: int, total_sq: float) -> None:
        self._server.clip_total(step, total_sq)

    def close(self, reason: str) -> None:
        self._server.close(reason)

    def stop(self) -> None:
        self._stopped.set()
        self._server.stop()


class RayShards:
    """Shards 1 to ``count - 1`` of ``config``'s job (``count`` stores: the control and the
    shards) as Ray actors (``OtherShards``)."""

    def __init__(self, config: StoreConfig, count: int, *, max_model_bytes: int,
                 tls: tuple[bytes, bytes] | None = None) -> None:
        """``tls``: the server's certificate chain and key (PEM), for the shards' TCP ports; they
        reach the actors through Ray, inside the cluster (whose nodes the server trusts to run
        its jobs' code)."""
        import ray

        self._ray = ray
        self._tls = tls
        self._actors: list[Any] = []
        self._serving: dict[Any, int] = {}
        placements = _placements(count - 1)
        try:
            self._endpoints = self._start(config, count, max_model_bytes, placements)
        except Exception as e:  # a node chosen may have died meanwhile: Ray places them
            if all(p == "SPREAD" for p in placements):
                raise
            log.warning("job %s: its shards could not start on the nodes chosen (%s); letting Ray place them",
                        config.job_id, e)
            self._endpoints = self._start(config, count, max_model_bytes, ["SPREAD"] * (count - 1))
        self._serving = {a.serve.remote(): i for i, a in enumerate(self._actors, start=1)}
        log.info("job %s: shards 1 to %d on %s", config.job_id, count - 1,
                 ", ".join(str(e["tcp_host"]) for e in self._endpoints))

    def _start(self, config: StoreConfig, count: int, max_model_bytes: int, placements: list[Any],
               ) -> list[dict[str, object]]:
        import dataclasses

        remote = self._ray.remote(ShardActor)
        self._actors = [
            remote.options(num_cpus=0, scheduling_strategy=strategy, max_restarts=0, max_concurrency=8)
            .remote(dataclasses.replace(config, shard=i, shards=count), max_model_bytes, self._tls)
            for i, strategy in enumerate(placements, start=1)]
        try:
            return self._all("endpoint", timeout=START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise

    def _all(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> list[Any]:
        return list(self._ray.get([getattr(a, method).remote(*args) for a in self._actors], timeout=timeout))

    def endpoints(self) -> list[dict[str, object]]:
        return list(self._endpoints)

    def register(self, rank: int, host: str, pid: int, credential: str, total_steps: int,
                 at_least: int | None = None) -> list[int]:
        return self._all("register", rank, host, pid, credential, total_steps, at_least)

    def follow(self, size: int, clocks: Sequence[int], at_once: bool = False) -> list[int]:
        return self._all("follow", size, tuple(clocks), at_once)

    def resume_from(self, states: Sequence[CheckpointState], total_steps: int) -> None:
        refs: dict[int, Any] = {}  # a state given to several shards (the whole model's) goes in once
        for state in states:
            refs.setdefault(id(state), self._ray.put(state))
        self._ray.get([a.resume_from.remote(refs[id(s)], total_steps)
                       for a, s in zip(self._actors, states, strict=True)], timeout=CALL_TIMEOUT_S)

    def captures(self, step: int) -> list[CheckpointState | None]:
        return self._all("capture", step)

    def checkpoint_states(self) -> list[CheckpointState]:
        return self._all("checkpoint_state")

    def stats(self) -> list[ShardStats]:
        return self._all("stats", timeout=10.0)

    def lost(self) -> list[int]:
        """The shards whose ``serve`` ended: only a stop or a death ends it."""
        refs = list(self._serving)
        done, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        return sorted(self._serving[r] for r in done)

    def mark_dead(self, rank: int) -> None:
        self._all("mark_dead", rank)

    def clip_held(self) -> list[int | None]:
        return self._all("clip_held")

    def clip_parts(self, step: int) -> list[float | None]:
        return self._all("clip_part", step)

    def clip_total(self, step: int, total_sq: float) -> None:
        self._all("clip_total", step, total_sq)

    def close(self, reason: str) -> None:
        self._all("close", reason)

    def stop(self) -> None:
        for actor in self._actors:
            try:
                self._ray.get(actor.stop.remote(), timeout=10.0)
            except Exception as e:  # noqa: BLE001 - best effort: the actor is killed next
                log.debug("shard stop failed: %s", e)
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                log.debug("shard kill failed: %s", e)
        self._actors = []
        self._serving = {}


def _placements(count: int) -> list[Any]:
    """Where ``count`` shards go: the alive nodes in turn, the others before this one (the
    server's); Ray's ``SPREAD`` when there is no other. The affinity is hard: Ray's soft one
    placed two shards on one node of two idle ones here."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here)
    if not others:
        return ["SPREAD"] * count
    nodes = [*others, here]
    return [NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False) for i in range(count)]
