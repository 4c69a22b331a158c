"""Ray adapter: gang-schedules a job's workers in a placement group and reports how they end.

The job manager only sees the ``Launcher`` / ``WorkerGroup`` interfaces, so it can
be tested with a fake; this module is the one place that talks to Ray.
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


class Launcher(Protocol):
    def total_resources(self) -> dict[str, float]: ...

    def launch(self, job_id: str, spec: JobSpec, runtime_env: Mapping[str, Any] | None,
               credential: str = "") -> WorkerGroup:
        """Start the job's workers, giving them ``credential`` (the job's: the server accepts
        their calls only with it)."""
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


def bundle(spec: JobSpec) -> dict[str, float]:
    """One worker's resources as a placement-group bundle."""
    out: dict[str, float] = {}
    if spec.resources.cpus > 0:
        out["CPU"] = spec.resources.cpus
    if spec.resources.gpus > 0:
        out["GPU"] = spec.resources.gpus
    return out or {"CPU": 0.01}  # a bundle must ask for something


def demand(spec: JobSpec) -> dict[str, float]:
    """The whole job's resources: its workers' and its spares'."""
    return {k: v * (spec.workers + spec.spares) for k, v in bundle(spec).items()}


class RayWorkerGroup:
    """A job's actors, one per rank, and its spares, in one placement group (a bundle each).

    Ray restarts a dead actor (up to ``max_restarts``) and ``rerun`` starts it again, in every
    mode (in allreduce, the survivors wait for it to join their next group). A job with
    ``spares`` keeps that many actors with the workload built and waiting: ``rerun`` of a dead
    rank then hands the rank to a ready spare (no new process, no imports, no build) and a new
    spare is prepared in the dead actor's bundle.
    """

    def __init__(self, job_id: str, spec: JobSpec, server_address: str, tls_ca: bytes | None,
                 runtime_env: Mapping[str, Any] | None, credential: str = "") -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from gradhub.worker.actor import WorkerActor

        self._ray = ray
        b = bundle(spec)
        self._pg = placement_group([dict(b) for _ in range(spec.workers + spec.spares)], strategy="SPREAD",
                                   name=f"gradhub-{job_id}")
        try:
            ray.get(self._pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except Exception:
            ray.util.remove_placement_group(self._pg)
            raise
        remote = ray.remote(WorkerActor)

        def make(rank: int, index: int) -> Any:
            return remote.options(
                num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0),
                max_restarts=spec.max_restarts, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=index),
                runtime_env=dict(runtime_env) if runtime_env else None,
            ).remote(job_id, rank, spec.to_json(), server_address, tls_ca, credential)

        self._make = make
        self._actors = [make(rank, rank) for rank in range(spec.workers)]
        self._bundles = list(range(spec.workers))  # the bundle each rank's actor is in
        self._spares: list[tuple[Any, int, Any]] = []  # (actor, bundle, its prepare() ref)
        self._later: list[tuple[float, int]] = []  # (when, bundle): spares to start
        for index in range(spec.workers, spec.workers + spec.spares):
            self._add_spare(index)
        self._runs: dict[Any, int] = {actor.run.remote(): rank for rank, actor in enumerate(self._actors)}

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
                                        unavailable=isinstance(e, ray.exceptions.ActorUnavailableError)))
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                exits.append(WorkerExit(rank, error=_reason(e), lost_peer=isinstance(cause, PeerLostError),
                                        traceback=cause.traceback if isinstance(cause, WorkerFailure) else "",
                                        phase=cause.phase if isinstance(cause, WorkerFailure) else ""))
        return exits

    def kill(self, rank: int) -> None:
        """Kill the actor's process; Ray restarts it if restarts are left."""
        self._ray.kill(self._actors[rank], no_restart=False)

    def stop(self) -> None:
        for actor in [*self._actors, *(spare for spare, _, _ in self._spares)]:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                log.debug("kill failed: %s", e)
        self._ray.util.remove_placement_group(self._pg)


class RayLauncher:
    """Launches worker groups on the Ray cluster this process is connected to; their workers
    reach the server at ``server_address``, over TLS verified with ``tls_ca`` (PEM) unless None."""

    def __init__(self, server_address: str, tls_ca: bytes | None = None) -> None:
        self.server_address, self.tls_ca = server_address, tls_ca

    def total_resources(self) -> dict[str, float]:
        import ray

        return {k: float(v) for k, v in ray.cluster_resources().items()}

    def launch(self, job_id: str, spec: JobSpec, runtime_env: Mapping[str, Any] | None,
               credential: str = "") -> WorkerGroup:
        env = dict(runtime_env or {})
        working_dir = env.get("working_dir")
        if isinstance(working_dir, str) and "://" not in working_dir:
            env["working_dir"] = upload_package(Path(working_dir))
        return RayWorkerGroup(job_id, spec, self.server_address, self.tls_ca, env or None, credential)


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

    def launch(self, job_id: str, spec: JobSpec, runtime_env: Mapping[str, Any] | None,
               credential: str = "") -> WorkerGroup:
        return _ExternalGroup()
