"""gRPC adapter for the SweepService: translates between protos and the SweepRunner, after asking
``gradhub.server.auth`` whether the caller may (a sweep's trials are jobs of its submitter, so
the job rules apply to the sweep as a whole). A watch is a coroutine woken by the job manager's
listener, as the JobService's are."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc.aio

from gradhub.proto.contract.sweep import SweepSpec
from gradhub.proto.v1 import sweeps_pb2, sweeps_pb2_grpc
from gradhub.server.auth import Action, Principal, Users
from gradhub.server.jobs import JobManager
from gradhub.server.limits import StreamLimits
from gradhub.server.rpc import authorization, handler
from gradhub.server.sweep_db import SweepRecord
from gradhub.server.sweep_runner import SweepRunner, SweepView
from gradhub.server.waits import Signal, follow, listen

T = TypeVar("T")
WATCH_REFRESH_S = 1.0  # a watch sends the sweep at least this often (its running trials move)


def sweep_to_proto(view: SweepView) -> sweeps_pb2.Sweep:
    out = _summary(view.record)
    spec = view.spec
    out.spec_json, out.metric, out.mode = view.record.spec_json, spec.objective.metric, spec.objective.mode
    out.trials_total, out.parallel = spec.trials, spec.parallel
    if view.best is not None:
        out.best = view.best
    for v in view.trials:
        t = v.record
        trial = out.trials.add(number=t.number, job_id=t.job_id, state=str(t.state),
                               params_json=json.dumps(t.params, sort_keys=True), metrics=t.metrics, step=v.job_step,
                               total_steps=v.job_total_steps, job_state=v.job_state, reason=t.reason,
                               evaluations=len(t.intermediate), created_at=t.created_at,
                               finished_at=t.finished_at or 0.0)
        if t.value is not None:
            trial.value = t.value
    return out


def _summary(rec: SweepRecord) -> sweeps_pb2.Sweep:
    return sweeps_pb2.Sweep(id=rec.id, name=rec.name, owner=rec.owner, state=str(rec.state), reason=rec.reason,
                            created_at=rec.created_at, finished_at=rec.finished_at or 0.0)


class SweepServiceServicer(sweeps_pb2_grpc.SweepServiceServicer):
    """Coroutines on the server's event loop; the blocking work runs in ``pool``."""

    def __init__(self, runner: SweepRunner, manager: JobManager, pool: Executor, users: Users | None = None,
                 limits: StreamLimits | None = None) -> None:
        self._runner, self._jobs, self._pool = runner, manager, pool
        self._users = users or Users.open()
        self._limits = limits or StreamLimits()
        self._signal: Signal | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def _allowed(self, context: grpc.aio.ServicerContext, action: Action, sweep_id: str | None = None,
                       ) -> Principal:
        principal = self._users.authenticate(authorization(context))
        owner = None if sweep_id is None else await self._run(self._runner.owner, sweep_id)
        principal.check(action, owner)
        return principal

    @handler
    async def SubmitSweep(self, request: sweeps_pb2.SubmitSweepRequest, context: grpc.aio.ServicerContext,
                          ) -> sweeps_pb2.SubmitSweepResponse:
        caller = await self._allowed(context, Action.SUBMIT)
        spec = SweepSpec.from_json(request.spec_json)  # validated again here, whatever the client did
        view = await self._run(self._runner.submit, spec, request.working_dir_zip or None, caller.name)
        return sweeps_pb2.SubmitSweepResponse(sweep=sweep_to_proto(view))

    @handler
    async def GetSweep(self, request: sweeps_pb2.GetSweepRequest, context: grpc.aio.ServicerContext,
                       ) -> sweeps_pb2.GetSweepResponse:
        return sweeps_pb2.GetSweepResponse(sweep=await self._run(
            lambda: sweep_to_proto(self._runner.get(request.sweep_id))))

    @handler
    async def ListSweeps(self, request: sweeps_pb2.ListSweepsRequest, context: grpc.aio.ServicerContext,
                         ) -> sweeps_pb2.ListSweepsResponse:
        records = await self._run(self._runner.list_sweeps)
        return sweeps_pb2.ListSweepsResponse(sweeps=[_summary(r) for r in records])

    @handler
    async def CancelSweep(self, request: sweeps_pb2.CancelSweepRequest, context: grpc.aio.ServicerContext,
                          ) -> sweeps_pb2.CancelSweepResponse:
        await self._allowed(context, Action.CANCEL, request.sweep_id)
        view = await self._run(self._runner.cancel, request.sweep_id)
        return sweeps_pb2.CancelSweepResponse(sweep=sweep_to_proto(view))

    @handler
    async def WatchSweep(self, request: sweeps_pb2.WatchSweepRequest, context: grpc.aio.ServicerContext,
                         ) -> AsyncIterator[sweeps_pb2.WatchSweepResponse]:
        if self._signal is None:
            self._signal = listen(self._jobs, asyncio.get_running_loop())
        with self._limits.hold("WatchSweep", context.peer()):
            async for view in follow(self._signal, lambda: self._run(self._runner.get, request.sweep_id),
                                     lambda v: v.record.state.terminal, WATCH_REFRESH_S):
                yield sweeps_pb2.WatchSweepResponse(sweep=sweep_to_proto(view))
