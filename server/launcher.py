"""Ray adapter: gang-schedules a job's workers in a placement group and reports how they end,
and starts a sharded parameter server's other shards (``gradhub.server.shard_actors``).

The job manager only sees the ``Launcher`` / ``WorkerGroup`` interfaces, so it can
be tested with a fake; this module and ``shard_actors`` are where jobs talk to Ray.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gradhub.proto.contract.errors import PeerLostError, WorkerFailure
from gradhub.proto.contract.spec import JobSpec
from gradhub.server.shard_set import LocalShards, OtherShards
from gradhub.server.store_config import StoreConfig

log = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120.0
# after a spare takes over, how long before its replacement is started (a new process importing
# torch and building the workload competes with the recovering group for CPU)
SPARE_DELAY_S = 10.0


@dataclass(frozen=True)
class WorkerExit:
    """How one ``run`` of a worker ended."""

    rank: int
    result: dict[str, Any] | None = None  # the WorkerResult, when it returned
    died: bool = False  # the process died (killed, OOM, node lost): Ray may restart it
    unavailable: bool = False  # with died: Ray is restarting the actor (not a final death)
    node_lost: bool = False  # with died: its node died (the cluster lost the machine, not just the process)
    error: str | None = None  # the worker raised: a bug or bad user code, not retried
    lost_peer: bool = False  # allreduce: it raised because another worker of its group is gone
    traceback: str = ""  # the worker's traceback (user frames included), for the job's log
    phase: str = ""  # where the worker failed (build, train, eval, checkpoint), when it said

    def failure(self) -> str:
        """The job's failure reason: ``worker 1 failed at training step 5: ValueError: ...``."""
        return f"worker {self.rank} failed {self.error}" if self.phase else f"worker {self.rank} failed: {self.error}"


class WorkerGroup(Protocol):
    def wait(self, timeout: float) -> list[WorkerExit]: ...

    def rerun(self, rank: int) -> str | None:
        """Run worker ``rank`` again; a note for the job's log when it runs somewhere new (a spare)."""
        ...

    def kill(self, rank: int) -> None: ...

    def stop(self) -> None: ...

    # an elastic job's
    def grow(self, ranks: list[int]) -> None:
        """Start workers for ``ranks`` (each with its own resources), or raise when they cannot
        be placed."""
        ...

    def release(self, rank: int) -> None:
        """Stop worker ``rank`` for good and give its resources back."""
        ...

    def move(self, rank: int, to: int) -> None:
        """Worker ``rank``'s process (whose run ended) runs rank ``to`` from now on, in its
        place; ``to``'s own worker is gone (it was released)."""
        ...

    def node_lost(self, rank: int) -> bool:
        """Whether the node worker ``rank`` was placed on is dead (Ray may say so only some
        seconds after the worker's process is gone)."""
        ...


class Launcher(Protocol):
    def total_resources(self) -> dict[str, float]: ...

    def nodes(self) -> int:
        """How many nodes of the cluster have room for work now, CPUs for workers
        (``ps_shards: auto``: a shard on each, beside the workers; a head started with
        ``--num-cpus=0``, as deploy/'s is, has none)."""
        ...

    def start_shards(self, config: StoreConfig, count: int, max_model_bytes: int,
                     tls: tuple[bytes, bytes] | None = None) -> OtherShards:
        """Start shards 1 to ``count - 1`` of the parameter server of the job whose control
        store (store 0 of ``count``) ``config`` describes (``tls``: the server's certificate
        chain and key, PEM, for their TCP ports); returns once every one serves."""
        ...

    def launch(self, job_id: str, spec: JobSpec, runtime_env: Mapping[str, Any] | None,
               credential: str = "", size: int | None = None) -> WorkerGroup:
        """Start the job's workers (``size`` of them: an elastic job's size now; None: the
        spec's), giving them ``credential`` (the job's: the server accepts their calls only
        with it)."""
        ...


def _reason(e: Exception, limit: int = 500) -> str:
    """A worker's exception as one line: the user's error, not Ray's traceback around it."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, WorkerFailure):  # already says where, in one line
        text = str(cause)
    elif cause is not None:
        text = f"{type(cause).__name__}: {cause}"
    else:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        text = lines[-1] if lines else type(e).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def node_died(error: str) -> bool:
    """Whether Ray's message of an actor's death says its node died (Ray says "its node has
    died" and names the node, as opposed to a process that was killed or crashed)."""
    text = error.lower()
    return "node has died" in text or "node died" in text or "node is dead" in text


def bundle(spec: JobSpec) -> dict[str, float]:
    """One worker's resources as a placement-group bundle."""
    out: dict[str, float] = {}
    if spec.resources.cpus > 0:
        out["CPU"] = spec.resources.cpus
    if spec.resources.gpus > 0:
        out["GPU"] = spec.resources.gpus
    return out or {"CPU": 0.01}  # a bundle must ask for something


def demand(spec: JobSpec, workers: int | None = None) -> dict[str, float]:
    """The whole job's resources: its workers' (``workers`` of them; None: the spec's) and its
    spares'."""
    n = spec.workers if workers is None else workers
    return {k: v * (n + spec.spares) for k, v in bundle(spec).items()}


class RayWorkerGroup:
    """A job's actors, one per rank, and its spares, in one placement group (a bundle each).

    Ray restarts a dead actor (up to ``max_restarts``) and ``rerun`` starts it again, in every
    mode (in allreduce, the survivors wait for it to join their next group). A job with
    ``spares`` keeps that many actors with the workload built and waiting: ``rerun`` of a dead
    rank then hands the rank to a ready spare (no new process, no imports, no build) and a new
    spare is prepared in the dead actor's bundle.
    """

    def __init__(self, job_id: str, spec: JobSpec, server_address: str, tls_ca: bytes | None,
                 runtime_env: Mapping[str, Any] | None, credential: str = "", size: int | None = None) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from gradhub.worker.actor import WorkerActor

        self._ray = ray
        b = bundle(spec)
        size = spec.workers if size is None else size
        self._job_id = job_id
        # a job of fixed size is gang-scheduled in one placement group (a bundle per worker and
        # spare); an elastic job's workers each have their own, given back when they leave
        self._elastic = spec.elastic
        self._pgs: dict[int, Any] = {}  # elastic: rank -> its placement group
        self._nodes: dict[int, str] = {}  # elastic: rank -> the Ray node its placement group was placed on
        self._placed = 0  # elastic: placement groups made so far
        self._pg = None if self._elastic else self._place([dict(b) for _ in range(size + spec.spares)], "")
        remote = ray.remote(WorkerActor)

        def make(rank: int, index: int) -> Any:
            pg, bundle_index = (self._pgs[rank], 0) if self._elastic else (self._pg, index)
            assert pg is not None
            return remote.options(
                num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0),
                max_restarts=spec.max_restarts, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=bundle_index),
                runtime_env=dict(runtime_env) if runtime_env else None,
            ).remote(job_id, rank, spec.to_json(), server_address, tls_ca, credential)

        self._make, self._bundle = make, b
        self._actors: dict[int, Any] = {}
        self._runs: dict[Any, int] = {}
        if self._elastic:
            self.grow(list(range(size)))
        else:
            self._actors = {rank: make(rank, rank) for rank in range(size)}
            self._runs = {actor.run.remote(): rank for rank, actor in self._actors.items()}
        self._bundles = list(range(size))  # the bundle each rank's actor is in (fixed size)
        self._spares: list[tuple[Any, int, Any]] = []  # (actor, bundle, its prepare() ref)
        self._later: list[tuple[float, int]] = []  # (when, bundle): spares to start
        for index in range(size, size + spec.spares):
            self._add_spare(index)

    def _place(self, bundles: list[dict[str, float]], suffix: str) -> Any:
        """A placement group of ``bundles``, ready (or the error of one that is not in time)."""
        from ray.util.placement_group import placement_group

        pg = placement_group(bundles, strategy="SPREAD", name=f"gradhub-{self._job_id}{suffix}")
        try:
            self._ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except Exception:
            self._ray.util.remove_placement_group(pg)
            raise
        return pg

    def grow(self, ranks: list[int]) -> None:
        """Start workers for ``ranks``, each in a placement group of its own (all placed, or none)."""
        from ray.util.placement_group import placement_group, placement_group_table

        # named for the job and rank, and unique: a removed group's name may linger in Ray a while
        self._placed += 1
        pgs = {rank: placement_group([dict(self._bundle)], name=f"gradhub-{self._job_id}-{rank}-{self._placed}")
               for rank in ranks}
        try:
            self._ray.get([pg.ready() for pg in pgs.values()], timeout=PLACEMENT_TIMEOUT_S)
        except Exception:
            for pg in pgs.values():
                self._ray.util.remove_placement_group(pg)
            raise
        self._pgs.update(pgs)
        for rank, pg in pgs.items():
            self._nodes[rank] = str(placement_group_table(pg)["bundles_to_node_id"].get(0, ""))
        for rank in ranks:
            self._actors[rank] = actor = self._make(rank, 0)
            self._runs[actor.run.remote()] = rank

    def release(self, rank: int) -> None:
        """Stop worker ``rank`` for good and give its placement group back."""
        actor = self._actors.pop(rank, None)
        if actor is not None:
            self._ray.kill(actor, no_restart=True)
        for ref in [ref for ref, r in self._runs.items() if r == rank]:
            del self._runs[ref]
        pg = self._pgs.pop(rank, None)
        self._nodes.pop(rank, None)
        if pg is not None:
            self._ray.util.remove_placement_group(pg)

    def move(self, rank: int, to: int) -> None:
        """Worker ``rank``'s actor runs rank ``to`` (``to``'s own is gone): it keeps its process
        and its placement group."""
        actor = self._actors.pop(rank)
        old = self._actors.pop(to, None)
        if old is not None:
            self._ray.kill(old, no_restart=True)
        if self._elastic:
            stale = self._pgs.pop(to, None)
            if stale is not None:
                self._ray.util.remove_placement_group(stale)
            self._pgs[to] = self._pgs.pop(rank)
            self._nodes[to] = self._nodes.pop(rank, "")
        self._actors[to] = actor
        self._runs[actor.run_as.remote(to)] = to

    def _add_spare(self, index: int) -> None:
        actor = self._make(-1, index)
        self._spares.append((actor, index, actor.prepare.remote()))

    def _ready_spare(self) -> tuple[Any, int] | None:
        """A spare whose workload is built (one that failed to prepare is dropped)."""
        for entry in list(self._spares):
            actor, index, prepared = entry
            done, _ = self._ray.wait([prepared], timeout=0)
            if not done:
                continue
            self._spares.remove(entry)
            try:
                self._ray.get(prepared, timeout=10)
            except Exception as e:  # noqa: BLE001 - a spare that cannot prepare is not used
                log.warning("a spare failed to prepare: %s", _reason(e))
                self._ray.kill(actor, no_restart=True)
                self._add_spare(index)
                continue
            return actor, index
        return None

    def rerun(self, rank: int) -> str | None:
        """Run worker ``rank`` again (its last run ended with its death): on a ready spare when
        there is one, else on its actor, which Ray restarts."""
        spare = self._ready_spare()
        if spare is not None:
            actor, index = spare
            # the dead actor is not restarted: the spare takes its rank, a new spare its bundle
            self._ray.kill(self._actors[rank], no_restart=True)
            self._later.append((time.monotonic() + SPARE_DELAY_S, self._bundles[rank]))
            self._actors[rank], self._bundles[rank] = actor, index
            self._runs[actor.run_as.remote(rank)] = rank
            return "a spare takes over (its workload is built)"
        self._runs[self._actors[rank].run.remote()] = rank
        return None

    def wait(self, timeout: float) -> list[WorkerExit]:
        ray = self._ray
        for due in [entry for entry in self._later if entry[0] <= time.monotonic()]:
            self._later.remove(due)
            self._add_spare(due[1])
        if not self._runs:
            return []
        ready, _ = ray.wait(list(self._runs), num_returns=len(self._runs), timeout=timeout)
        exits = []
        for ref in ready:
            rank = self._runs.pop(ref)
            try:
                exits.append(WorkerExit(rank, result=ray.get(ref, timeout=10)))
            except ray.exceptions.RayActorError as e:
                exits.append(WorkerExit(rank, died=True, error=str(e).splitlines()[0],
                                        unavailable=isinstance(e, ray.exceptions.ActorUnavailableError),
                                        node_lost=node_died(str(e)) or not self._node_alive(rank)))
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                exits.append(WorkerExit(rank, error=_reason(e), lost_peer=isinstance(cause, PeerLostError),
                                        traceback=cause.traceback if isinstance(cause, WorkerFailure) else "",
                                        phase=cause.phase if isinstance(cause, WorkerFailure) else ""))
        return exits

    def node_lost(self, rank: int) -> bool:
        return not self._node_alive(rank)

    def _node_alive(self, rank: int) -> bool:
        """Whether the Ray node worker ``rank`` was placed on is alive (True when unknown)."""
        node = self._nodes.get(rank)
        if not node:
            return True
        try:
            alive = {n["NodeID"]: bool(n["Alive"]) for n in self._ray.nodes()}
        except Exception as e:  # noqa: BLE001 - unknown: not a node death
            log.debug("ray.nodes() failed: %s", e)
            return True
        return alive.get(node, False)

    def kill(self, rank: int) -> None:
        """Kill the actor's process; Ray restarts it if restarts are left."""
        self._ray.kill(self._actors[rank], no_restart=False)

    def stop(self) -> None:
        for actor in [*self._actors.values(), *(spare for spare, _, _ in self._spares)]:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                log.debug("kill failed: %s", e)
        for pg in [self._pg, *self._pgs.values()]:
            if pg is not None:
                self._ray.util.remove_placement_group(pg)


class RayLauncher:
    """Launches worker groups on the Ray cluster this process is connected to; their workers
    reach the server at ``server_address``, over TLS verified with ``tls_ca`` (PEM) unless None."""

    def __init__(self, server_address: str, tls_ca: bytes | None = None) -> None:
        self.server_address, self.tls_ca = server_address, tls_ca

    def total_resources(self) -> dict[str, float]:
        import ray

        return {k: float(v) for k, v in ray.cluster_resources().items()}

    def nodes(self) -> int:
        import ray

        return max(1, sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0))

    def start_shards(self, config: StoreConfig, count: int, max_model_bytes: int,
                     tls: tuple[bytes, bytes] | None = None) -> OtherShards:
        from gradhub.server.shard_actors import RayShards

        return RayShards(config, count, max_model_bytes=max_model_bytes, tls=tls)

    def launch(self, job_id: str, spec: JobSpec, runtime_env: Mapping[str, Any] | None,
               credential: str = "", size: int | None = None) -> WorkerGroup:
        env = dict(runtime_env or {})
        working_dir = env.get("working_dir")
        if isinstance(working_dir, str) and "://" not in working_dir:
            env["working_dir"] = upload_package(Path(working_dir))
        return RayWorkerGroup(job_id, spec, self.server_address, self.tls_ca, env or None, credential, size)


def upload_package(zip_path: Path) -> str:
    """Put a packed working_dir into Ray's GCS; returns its ``gcs://`` URI for a runtime_env.

    An actor's runtime_env takes only URIs (Ray uploads local paths for a whole job at
    ``ray.init``, not per actor), so the server uploads the zip it stored, as ``ray.init``
    would: content-addressed (a resubmitted folder is not uploaded twice), pinned until the
    actors that use it hold their own reference, extracted as is on every node (no top-level
    folder is stripped, unlike remote zip URIs). Done at launch, so a restarted server
    uploads again to its new Ray.
    """
    from ray._private.runtime_env.packaging import (
        get_uri_for_package,
        package_exists,
        pin_runtime_env_uri,
        upload_package_to_gcs,
    )

    uri = get_uri_for_package(zip_path)
    if not package_exists(uri):
        upload_package_to_gcs(uri, zip_path.read_bytes())
    pin_runtime_env_uri(uri)
    return uri


class _ExternalGroup:
    """Workers that someone else runs: nothing to wait for, restart or stop."""

    def __init__(self) -> None:
        self._stopped = threading.Event()

    def wait(self, timeout: float) -> list[WorkerExit]:
        self._stopped.wait(timeout)
        return []

    def rerun(self, rank: int) -> str | None:
        return None

    def kill(self, rank: int) -> None:
        pass

    def stop(self) -> None:
        self._stopped.set()

    def grow(self, ranks: list[int]) -> None:
        pass

    def release(self, rank: int) -> None:
        pass

    def move(self, rank: int, to: int) -> None:
        pass

    def node_lost(self, rank: int) -> bool:
        return False


class ExternalLauncher:
    """Launches nothing: the workers are external processes speaking the WorkerControl and
    ParameterServer protocols themselves (benchmarks, protocol tests, a hand-rolled launcher).
    They need the job's worker credential: ``JobManager.job_credential(job_id)`` (passed as
    ``ServerLink(credential=...)``).

    ``resources`` is what the queue believes the cluster has.
    """

    def __init__(self, resources: Mapping[str, float] | None = None) -> None:
        self._resources = dict(resources or {"CPU": 64.0})

    def total_resources(self) -> dict[str, float]:
        return dict(self._resources)

    def nodes(self) -> int:
        return 1

    def start_shards(self, config: StoreConfig, count: int, max_model_bytes: int,
                     tls: tuple[bytes, bytes] | None = None) -> OtherShards:
        """Shards in this process, on the loopback address (its workers run on this host)."""
        return LocalShards(config, count, "127.0.0.1", max_model_bytes=max_model_bytes, tls=tls)

    def launch(self, job_id: str, spec: JobSpec, runtime_env: Mapping[str, Any] | None,
               credential: str = "", size: int | None = None) -> WorkerGroup:
        return _ExternalGroup()
