"""A worker's training loop in the parameter-server modes (plain Python; the Ray actor wraps it).

Step t of rank r trains on ``worker_batch_indices(n, b, N, r, seed, t)``: a pure
function of (seed, rank, world size, step). A restarted worker therefore resumes
at the step the server says and recomputes exactly the gradient it owed.
"""

from __future__ import annotations

import logging
import os
import socket

from gradhub.client.spec import JobSpec
from gradhub.worker.flat import FlatModel
from gradhub.worker.ps_client import PSClient
from gradhub.worker.workload import Heartbeat, Meter, WorkerResult, Workload

log = logging.getLogger(__name__)


class PSTrainer:
    """Runs one worker of a ps-* job against a parameter server."""

    def __init__(self, spec: JobSpec, rank: int, client: PSClient) -> None:
        self.spec, self.rank, self.client = spec, rank, client

    def run(self) -> WorkerResult:
        rank = self.rank
        work = Workload.build(self.spec, rank)
        model, total = work.model, work.total
        flat = FlatModel(model)

        reg = self.client.register(socket.gethostname(), os.getpid(), total, work.train_size)
        if reg.needs_init:
            self.client.init_parameters(flat.layout, flat.params.detach().cpu())
        step = reg.next_step
        result = WorkerResult(rank=rank, steps_run=0)
        meter = Meter(work.device)
        with Heartbeat(self.client, reg.heartbeat_interval_s) as beat:
            version = self.client.pull(flat.layout, step, flat.params) if step < total else 0
            while step < total:
                if beat.stop_reason is not None:
                    result.stopped = beat.stop_reason
                    return result
                if work.eval_due(step):
                    self.client.report(step, "eval", work.evaluate())
                x, y = work.batch(step)
                flat.zero_grad()
                loss = work.loss_fn(model(x), y)
                loss.backward()
                if step + 1 < total or rank == 0:
                    # push step t and receive step t + 1's parameters (rank 0's last pull is the
                    # final parameters, which it evaluates)
                    version = self.client.push_pull(flat.layout, step, version, flat.gather_grads(), flat.params)
                else:
                    self.client.push(flat.layout, step, version, flat.gather_grads())
                step += 1
                beat.step = step
                result.steps_run += 1
                meter.add(loss, len(x))
                if (metrics := meter.due(step == total)) is not None:
                    self.client.report(step, "train", metrics)
            if rank == 0:
                if result.steps_run == 0:  # resumed at the end: fetch the final parameters
                    self.client.pull(flat.layout, total, flat.params)
                if work.val is not None:
                    result.metrics = work.evaluate()
                    self.client.report(total, "eval", result.metrics)
        return result
