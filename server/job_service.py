"""gRPC adapter for the JobService: translates between protos and JobManager / CheckpointStore calls,
after asking ``gradhub.server.auth`` whether the caller may (users act on their own jobs only).
Watches and followed logs are coroutines on the server's event loop, woken by the manager's
listener: an open watch holds no thread."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
import grpc.aio

from gradhub.proto.contract.errors import ProtocolError
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.v1 import jobs_pb2, jobs_pb2_grpc
from gradhub.server.auth import Action, Principal, Users
from gradhub.server.checkpoints import CheckpointInfo, CheckpointStore
from gradhub.server.jobs import JobManager, JobView
from gradhub.server.limits import StreamLimits
from gradhub.server.rpc import authorization, handler
from gradhub.server.waits import Signal, follow, listen

T = TypeVar("T")
WATCH_REFRESH_S = 1.0  # a watch sends the job at least this often (its metrics move between changes)
DEFAULT_PAGE, MAX_PAGE = 100, 1000  # ListJobs


def job_to_proto(view: JobView, summary: bool = False, tensorboard_dir: str = "") -> jobs_pb2.Job:
    """The job as the API shows it; a ``summary`` (ListJobs) leaves out the spec."""
    r = view.record
    world_size, min_workers = _sizes(r.spec_json)
    return jobs_pb2.Job(tensorboard_dir=tensorboard_dir,
        id=r.id, name=r.name, mode=r.mode, state=jobs_pb2.JobState.Value(r.state), reason=r.reason,
        spec_json="" if summary else r.spec_json, world_size=world_size, created_at=r.created_at, started_at=r.started_at or 0.0,
        finished_at=r.finished_at or 0.0, step=r.step, total_steps=r.total_steps, version=r.version,
        metrics=r.metrics, samples_per_second=r.samples_per_second, owner=r.owner,
        size=view.size, target_size=view.target, min_workers=min_workers,
        workers=[
            jobs_pb2.WorkerStatus(rank=w.rank, state=w.state, step=w.step, staleness=w.staleness,
                                  max_staleness=w.max_staleness, host=w.host, restarts=w.restarts, pid=w.pid,
                                  transport=w.transport, local_step=w.local_step)
            for w in view.workers
        ],
        shards=[jobs_pb2.ShardStatus(index=s.index, host=s.host, first=s.first, end=s.end, version=s.version,
                                     bytes_in=s.bytes_in, bytes_out=s.bytes_out, updates_per_s=s.updates_per_s,
                                     pid=s.pid)
                for s in view.shards],
    )


def _sizes(spec_json: str) -> tuple[int, int]:
    """The spec's workers (an elastic job's largest size) and an elastic job's smallest size (0
    for a job of fixed size), from one parse of the stored spec; (0, 0) for a spec that no
    longer reads (its job fails with a reason at start)."""
    try:
        workers = json.loads(spec_json).get("workers", 0)
    except (ValueError, AttributeError):
        return 0, 0
    try:
        if isinstance(workers, dict):
            return int(workers.get("max", 0)), int(workers.get("min", 1))
        return int(workers), 0
    except (ValueError, TypeError):
        return 0, 0


def checkpoint_to_proto(info: CheckpointInfo) -> jobs_pb2.CheckpointInfo:
    return jobs_pb2.CheckpointInfo(job_id=info.job_id, step=info.step, version=info.version,
                                   size_bytes=info.size_bytes, sha256=info.sha256, created_at=info.created_at)


class JobServiceServicer(jobs_pb2_grpc.JobServiceServicer):
    """Every method is a coroutine on the server's event loop; the blocking work (the job database,
    checkpoint files) runs in a pool of the service's own, so a user's call never queues behind the
    workers' traffic (registrations and heartbeats of hundreds of workers run in the server's
    pool), and a watch or a followed log holds no thread while it waits."""

    def __init__(self, manager: JobManager, checkpoints: CheckpointStore, pool: Executor,
                 limits: StreamLimits | None = None, users: Users | None = None) -> None:
        self._jobs, self._ckpts = manager, checkpoints
        self._pool = pool
        self._users = users or Users.open()  # who the callers are (the interceptor let in only known ones)
        self._limits = limits or StreamLimits()
        self._signal: Signal | None = None  # the manager's changes, on the event loop

    def _changes(self) -> Signal:
        if self._signal is None:
            self._signal = listen(self._jobs, asyncio.get_running_loop())
        return self._signal

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def _allowed(self, context: grpc.aio.ServicerContext, action: Action, job_id: str | None = None,
                       ) -> Principal:
        """The caller, when it may ``action`` the job ``job_id`` (NOT_FOUND for an unknown job
        first, then PERMISSION_DENIED naming the rule)."""
        principal = self._users.authenticate(authorization(context))
        owner = None if job_id is None else await self._run(self._jobs.owner, job_id)
        principal.check(action, owner)
        return principal

    @handler
    async def SubmitJob(self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext,
                        ) -> jobs_pb2.SubmitJobResponse:
        caller = await self._allowed(context, Action.SUBMIT)
        spec = JobSpec.from_json(request.spec_json)  # validated again here, whatever the client did
        view = await self._run(self._jobs.submit, spec, request.working_dir_zip or None, caller.name)
        return jobs_pb2.SubmitJobResponse(job=job_to_proto(view))

    @handler
    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.GetJobResponse:
        return jobs_pb2.GetJobResponse(job=await self._run(lambda: job_to_proto(
            self._jobs.get(request.job_id), tensorboard_dir=str(self._jobs.tensorboard_dir(request.job_id)))))

    @handler
    async def GetJobMetrics(self, request: jobs_pb2.GetJobMetricsRequest, context: grpc.aio.ServicerContext,
                            ) -> jobs_pb2.GetJobMetricsResponse:
        points = await self._run(self._jobs.points, request.job_id, request.after)
        return jobs_pb2.GetJobMetricsResponse(points=[
            jobs_pb2.MetricPoint(seq=p.seq, step=p.step, kind=p.kind, metrics=p.metrics, at=p.at) for p in points])

    @handler
    async def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext,
                       ) -> jobs_pb2.ListJobsResponse:
        size = request.page_size or DEFAULT_PAGE
        if not 1 <= size <= MAX_PAGE:
            raise ProtocolError(f"page_size: must be 1 to {MAX_PAGE}, got {request.page_size}")
        try:
            after = int(request.page_token or 0)
        except ValueError:
            raise ProtocolError(f"page_token: {request.page_token[:40]!r} is not a token this server gave") from None
        views, last = await self._run(self._jobs.page, after, size)
        return jobs_pb2.ListJobsResponse(jobs=[job_to_proto(v, summary=True) for v in views],
                                         next_page_token=str(last) if len(views) == size else "")

    @handler
    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext,
                        ) -> jobs_pb2.CancelJobResponse:
        await self._allowed(context, Action.CANCEL, request.job_id)
        return jobs_pb2.CancelJobResponse(job=await self._run(lambda: job_to_proto(self._jobs.cancel(request.job_id))))

    @handler
    async def ScaleJob(self, request: jobs_pb2.ScaleJobRequest, context: grpc.aio.ServicerContext,
                       ) -> jobs_pb2.ScaleJobResponse:
        await self._allowed(context, Action.SCALE, request.job_id)
        view = await self._run(self._jobs.scale, request.job_id, request.workers)
        return jobs_pb2.ScaleJobResponse(job=job_to_proto(view))

    @handler
    async def DeleteJob(self, request: jobs_pb2.DeleteJobRequest, context: grpc.aio.ServicerContext,
                        ) -> jobs_pb2.DeleteJobResponse:
        await self._allowed(context, Action.DELETE, request.job_id)
        await self._run(self._jobs.delete, request.job_id)
        return jobs_pb2.DeleteJobResponse()

    @handler
    async def WatchJob(self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        """The job now and after every change (at least every WATCH_REFRESH_S), until it ends."""
        with self._limits.hold("WatchJob", context.peer()):
            async for view in follow(self._changes(), lambda: self._run(self._jobs.get, request.job_id),
                                     lambda v: v.record.state.terminal, WATCH_REFRESH_S):
                yield jobs_pb2.WatchJobResponse(job=job_to_proto(view))

    @handler
    async def ListCheckpoints(self, request: jobs_pb2.ListCheckpointsRequest, context: grpc.aio.ServicerContext,
                              ) -> jobs_pb2.ListCheckpointsResponse:
        await self._run(self._jobs.get, request.job_id)  # NOT_FOUND for an unknown job
        infos = await self._run(self._ckpts.list, request.job_id)
        return jobs_pb2.ListCheckpointsResponse(checkpoints=[checkpoint_to_proto(i) for i in infos])

    @handler
    async def PullCheckpoint(self, request: jobs_pb2.PullCheckpointRequest, context: grpc.aio.ServicerContext,
                             ) -> AsyncIterator[jobs_pb2.PullCheckpointResponse]:
        await self._allowed(context, Action.PULL, request.job_id)
        info = await self._run(self._ckpts.get, request.job_id, request.step if request.HasField("step") else None)
        yield jobs_pb2.PullCheckpointResponse(info=checkpoint_to_proto(info))
        chunks = self._ckpts.iter_bytes(info)
        while (data := await self._run(next, chunks, None)) is not None:  # file reads off the loop
            yield jobs_pb2.PullCheckpointResponse(data=data)

    @handler
    async def GetJobLogs(self, request: jobs_pb2.GetJobLogsRequest, context: grpc.aio.ServicerContext,
                         ) -> AsyncIterator[jobs_pb2.GetJobLogsResponse]:
        signal, after = self._changes(), 0
        with self._limits.hold("GetJobLogs", context.peer()) if request.follow else contextlib.nullcontext():
            while True:
                changed = signal.event
                lines = await self._run(self._jobs.logs, request.job_id, after)
                if lines:
                    after = lines[-1][0]
                    yield jobs_pb2.GetJobLogsResponse(lines=[text for _, text in lines])
                if not request.follow:
                    return
                if (await self._run(self._jobs.get, request.job_id)).record.state.terminal:
                    if not await self._run(self._jobs.logs, request.job_id, after):
                        return
                    continue
                await signal.wait(changed, WATCH_REFRESH_S)
