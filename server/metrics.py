"""What ``/metrics`` shows Prometheus (prometheus-client's text format), from a registry of the
server's own (several servers may share a process: tests, the demo).

Read at scrape time from the manager (nothing to keep in step): jobs by state, the queue, and
per running job and worker its step, samples/s, loss, staleness (a histogram per job), restarts,
bytes pushed and pulled, and a step's time split into compute and communication; the parameter
server's updates and bytes (one shard, ``shard="0"``, until jobs are sharded). Counted as they
happen: gRPC calls by method and status code (``RpcCounter``, an interceptor).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc.aio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gradhub.server.jobs import JobManager
from gradhub.server.store import ParameterStore

STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)


class JobsCollector(Collector):
    """The manager's jobs, read when Prometheus scrapes."""

    def __init__(self, manager: JobManager) -> None:
        self._jobs = manager

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily("gradhub_jobs", "Jobs by state.", labels=["state"])
        for job_state, n in self._jobs.db.counts().items():
            states.add_metric([str(job_state)], n)
        yield states
        yield GaugeMetricFamily("gradhub_queue_length", "Jobs waiting in the queue.", value=self._jobs.queue_length())

        worker = ["job", "rank"]
        step = GaugeMetricFamily("gradhub_worker_step", "Steps a worker has done.", labels=worker)
        rate = GaugeMetricFamily("gradhub_worker_samples_per_second", "A worker's training samples/s.", labels=worker)
        loss = GaugeMetricFamily("gradhub_worker_loss", "A worker's training loss (its last report).", labels=worker)
        compute = GaugeMetricFamily("gradhub_worker_compute_seconds", "A step's computing time.", labels=worker)
        comm = GaugeMetricFamily("gradhub_worker_communication_seconds",
                                 "A step's communicating time (pushes and pulls, or the all-reduce).", labels=worker)
        restarts = CounterMetricFamily("gradhub_worker_restarts", "A worker's deaths.", labels=worker)
        pushed = CounterMetricFamily("gradhub_worker_pushed_bytes", "Gradient bytes a worker pushed.", labels=worker)
        pulled = CounterMetricFamily("gradhub_worker_pulled_bytes", "Parameter bytes a worker pulled.", labels=worker)
        updates = CounterMetricFamily("gradhub_ps_updates", "Updates a parameter-server shard applied.",
                                      labels=["job", "shard"])
        ps_in = CounterMetricFamily("gradhub_ps_received_bytes", "Bytes a parameter-server shard received.",
                                    labels=["job", "shard"])
        ps_out = CounterMetricFamily("gradhub_ps_sent_bytes", "Bytes a parameter-server shard sent.",
                                     labels=["job", "shard"])
        staleness = HistogramMetricFamily("gradhub_staleness", "Staleness of the gradients applied (ps-async, "
                                          "ps-ssp): versions between a gradient's base and its update.",
                                          labels=["job"])
        for run in self._jobs.running():
            state = run.state
            if state is None:
                continue
            reports = run.worker_metrics()
            snap = run.snapshot()
            workers = state.workers()
            for w in workers:
                labels = [run.id, str(w.rank)]
                step.add_metric(labels, w.clock)
                restarts.add_metric(labels, snap.restarts[w.rank] if snap.restarts else 0)
                report = reports.get(w.rank, {})
                for family, key in ((rate, "samples_per_s"), (loss, "loss"), (compute, "compute_s"),
                                    (comm, "comm_s")):
                    if key in report:
                        family.add_metric(labels, report[key])
                if isinstance(state, ParameterStore):
                    pushed.add_metric(labels, w.bytes_in)
                    pulled.add_metric(labels, w.bytes_out)
            if isinstance(state, ParameterStore):
                shard = [run.id, "0"]
                updates.add_metric(shard, state.version)
                ps_in.add_metric(shard, sum(w.bytes_in for w in workers))
                ps_out.add_metric(shard, sum(w.bytes_out for w in workers))
                counts = dict(state.staleness_counts)
                cumulative = [(str(b), sum(n for s, n in counts.items() if s <= b)) for b in STALENESS_BUCKETS]
                total = sum(counts.values())
                staleness.add_metric([run.id], [*cumulative, ("+Inf", total)],
                                     sum_value=float(sum(s * n for s, n in counts.items())))
        yield from (step, rate, loss, compute, comm, restarts, pushed, pulled, updates, ps_in, ps_out, staleness)


class RpcCounter(grpc.aio.ServerInterceptor):
    """Counts every gRPC call by method and status code (``gradhub_rpc_calls_total``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._calls = Counter("gradhub_rpc_calls", "gRPC calls by method and status code.", ["method", "code"],
                              registry=registry)

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = str(handler_call_details.method).rsplit("/", 1)[-1]
        kind = ("stream" if handler.request_streaming else "unary") + "_" + (
            "stream" if handler.response_streaming else "unary")
        return handler._replace(**{kind: _counted(getattr(handler, kind), lambda code: self._count(method, code))})

    def _count(self, method: str, code: Any) -> None:
        name = code.name if isinstance(code, grpc.StatusCode) else "OK" if code in (None, 0) else str(code)
        self._calls.labels(method, name).inc()


def _counted(behavior: Callable[..., Any], count: Callable[[Any], None]) -> Callable[..., Any]:
    """``behavior`` (sync or async, unary or streaming) that reports its call's status code."""

    def code(context: Any, error: BaseException | None) -> Any:
        got = context.code() if hasattr(context, "code") else None
        if got is None and error is not None:
            return grpc.StatusCode.CANCELLED if isinstance(error, grpc.RpcError) else grpc.StatusCode.UNKNOWN
        return got

    if inspect.isasyncgenfunction(behavior):
        async def agen(request: Any, context: Any) -> Any:
            error = None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as e:
                error = e
                raise
            finally:
                count(code(context, error))
        return agen
    if inspect.iscoroutinefunction(behavior):
        async def acall(request: Any, context: Any) -> Any:
            error = None
            try:
                return await behavior(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                count(code(context, error))
        return acall

    def call(request: Any, context: Any) -> Any:
        error = None
        try:
            result = behavior(request, context)
        except BaseException as e:
            error = e
            count(code(context, error))
            raise
        if inspect.isgenerator(result):
            return _counted_iter(result, context, count, code)
        count(code(context, None))
        return result
    return call


def _counted_iter(items: Iterator[Any], context: Any, count: Callable[[Any], None],
                  code: Callable[[Any, BaseException | None], Any]) -> Iterator[Any]:
    error = None
    try:
        yield from items
    except BaseException as e:
        error = e
        raise
    finally:
        count(code(context, error))


def metrics_routes(manager: JobManager, registry: CollectorRegistry) -> list[web.RouteDef]:
    """``GET /metrics``: the registry (with the jobs' collector in it) in Prometheus' format."""
    registry.register(JobsCollector(manager))

    async def metrics(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, registry)  # reads the database: off the loop
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return [web.get("/metrics", metrics)]

