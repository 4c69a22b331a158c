"""A worker's training loop in the parameter-server modes (plain Python; the Ray actor wraps it).

Step t of rank r trains on ``worker_batch_indices(n, b, N, r, seed, t)``: a pure
function of (seed, rank, world size, step). A restarted worker therefore resumes
at the step the server says and recomputes exactly the gradient it owed.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from gradhub.proto.contract.errors import ReleasedError, WorkerFailure
from gradhub.proto.contract.optim import parameter_groups
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.v1 import ps_pb2
from gradhub.worker.buckets import BucketPusher
from gradhub.worker.flat import FlatModel
from gradhub.worker.server_link import Pulled, ServerLink
from gradhub.worker.workload import Heartbeat, Meter, Phase, WorkerResult, Workload

log = logging.getLogger(__name__)


class Joined:
    """A worker's registration with the parameter server (the first of a job's workers sends
    the initial state), and what its job does with buffers: which worker sends its own (rank
    0's for "broadcast", the job's; every worker's for "average"), and whether a pull brings
    the job's into the model (not for "local")."""

    def __init__(self, reg: ps_pb2.RegisterResponse, flat: FlatModel, send_buffers: bool, take_buffers: bool,
                 client: ServerLink) -> None:
        self.reg, self._flat, self._client = reg, flat, client
        self.send_buffers, self._take_buffers = send_buffers, take_buffers

    @classmethod
    def register(cls, client: ServerLink, flat: FlatModel, work: Workload, total: int) -> Joined:
        """Register for a job of ``total`` steps (rounds, in local-sgd)."""
        spec = work.spec
        reg = client.register(socket.gethostname(), os.getpid(), total, work.train_size)
        if reg.needs_init:
            client.init_parameters(flat.state, flat.params.detach().cpu(), flat.frozen_flat(), flat.buffer_values())
        return cls(reg, flat, send_buffers=bool(flat.buffers) and (work.rank == 0 or spec.buffers == "average"),
                   take_buffers=bool(flat.buffers) and spec.buffers != "local", client=client)

    def received(self, pulled: Pulled, work: Workload | None = None) -> int:
        """Take a pull's buffers (when the job shares them) and, for an elastic job, its size
        now (``work`` trains on its share of each global batch); returns the parameters' version."""
        if self._take_buffers:
            self._flat.load_buffers(pulled.buffers)
        if work is not None and pulled.world_size:
            work.resize(work.rank, pulled.world_size)
            self._client.world_size = pulled.world_size
        return pulled.version


class PSTrainer:
    """Runs one worker of a ps-* job against a parameter server."""

    def __init__(self, spec: JobSpec, rank: int, client: ServerLink, work: Workload | None = None) -> None:
        self.spec, self.rank, self.client = spec, rank, client
        self.phase = Phase()
        self._prepared = work  # a workload built ahead (a spare's), else built at the start of the run

    def run(self) -> WorkerResult:
        """Train to the end; a failure is raised as a WorkerFailure naming the phase and step
        (the server keeps the job's state: it owns the parameters in these modes). A worker
        that an elastic job shrank away from returns, ``released``."""
        try:
            return self._run()
        except ReleasedError as e:
            log.info("worker %d leaves: %s", self.rank, e)
            return WorkerResult(rank=self.rank, steps_run=0, stopped=str(e), released=True)
        except WorkerFailure:
            raise
        except Exception as e:
            raise self.phase.failure(e) from e

    def _run(self) -> WorkerResult:
        rank, spec, phase = self.rank, self.spec, self.phase
        work = self._prepared or Workload.build(spec, rank)
        model, total = work.model, work.total
        flat = FlatModel(model)
        parameter_groups(list(flat.trainable.items()), spec.optimizer.param_groups)  # names a group that matches nothing
        joined = Joined.register(self.client, flat, work, total)
        reg, received, send_buffers = joined.reg, joined.received, joined.send_buffers
        step = reg.next_step
        result = WorkerResult(rank=rank, steps_run=0)
        meter = Meter(work.device)

        mb = spec.effective_bucket_mb
        pusher = BucketPusher(self.client, flat, int(mb * 2**20), spec.accumulate,
                              enabled=mb > 0 and not work.precision.scaled,
                              pull_buckets=_pulls_buckets(spec, work, self.client))

        with Heartbeat(self.client, reg.heartbeat_interval_s) as beat, pusher:
            version = received(self.client.pull(flat.layout, step, flat.params), work) if step < total else 0
            if spec.mode == "ps-sync":
                step = max(step, version)  # a worker joining an elastic job starts at the step the others are at
            while step < total:
                if beat.stop_reason is not None:
                    result.stopped = beat.stop_reason
                    return result
                if work.eval_due(step):
                    phase.at("eval", step)
                    pusher.land()  # every parameter pulled beside, in the model
                    self.client.report(step, "eval", work.evaluate())
                phase.at("train", step)
                last = step + 1 == total and rank != 0 and not spec.elastic
                pusher.begin(step, version, pull_next=not last)  # buckets go out while backward runs
                loss, samples = work.gradient(step, model, flat.zero_grad, lambda: [flat.grads],
                                              pusher.micro_batch if pusher.bucketed else None)
                flat.gather_grads()
                buffers = flat.buffer_values() if send_buffers else None
                sent = time.perf_counter()
                # the rest of step t, and step t + 1's parameters (rank 0's last pull is the final
                # parameters, which it evaluates; every worker of an elastic job pulls after its
                # last step, which the job may have to do again at another size)
                pulled = pusher.finish(buffers, flat.unused(), None if last else flat.params)
                step += 1
                if pulled is not None:
                    version = received(pulled, work)
                    if spec.mode == "ps-sync" and version < step:
                        step = version  # the job shrank mid-step: that step again, at the new size
                beat.step = step
                result.steps_run += 1
                meter.add(loss, samples, time.perf_counter() - sent)
                if (metrics := meter.due(step == total)) is not None:
                    self.client.report(step, "train", metrics)
            pusher.land()
            if rank == 0:
                if result.steps_run == 0:  # resumed at the end: fetch the final parameters
                    received(self.client.pull(flat.layout, total, flat.params))
                if work.val is not None:
                    phase.at("eval", total)
                    result.metrics = work.evaluate()
                    self.client.report(total, "eval", result.metrics)
        return result


def _pulls_buckets(spec: JobSpec, work: Workload, client: ServerLink) -> bool:
    """Whether a bucketed worker pulls each bucket's parameters beside its pushes as the server
    applies it (``BucketPusher``): in ps-sync on the data plane, for a worker on a GPU, whose
    CPU and network link idle while backward runs. A CPU worker's pull thread would take the
    cores backward runs on (README, Performance (g)). With shards the pull comes after backward
    (a bucket's pieces are on several shards)."""
    return (spec.mode == "ps-sync" and spec.applies_buckets and client.transport != "grpc"
            and work.device.type == "cuda" and spec.ps_shards == 1)
