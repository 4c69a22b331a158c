"""A worker's loop in ``local-sgd`` mode (DiLoCo, arXiv 2311.08105): each round it pulls the
global parameters, takes ``local_steps`` steps of the job's (inner) optimizer on its own data,
and pushes the pseudo-gradient ``global - local``; the parameter server averages them (every
worker's, ``outer_sync``; or each on arrival) and takes the outer optimizer's step.

Inner step ``s`` (counted over the whole job, ``round * local_steps + h``) trains on this rank's
share of global batch ``s``, as in every mode, and the inner optimizer, its schedule (over the
job's inner steps) and gradient clipping run here and keep their state from round to round.
Only the pseudo-gradient and the parameters cross the network: once a round.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from gradhub.proto.codec import torch_dtype
from gradhub.proto.contract.errors import WorkerFailure
from gradhub.proto.contract.optim import build_scheduler, clip_gradients
from gradhub.proto.contract.spec import JobSpec
from gradhub.worker.flat import FlatModel
from gradhub.worker.server_link import Pulled, ServerLink
from gradhub.worker.workload import Heartbeat, Meter, Phase, WorkerResult, Workload

log = logging.getLogger(__name__)


class LocalSGDTrainer:
    """Runs one worker of a local-sgd job against the parameter server."""

    def __init__(self, spec: JobSpec, rank: int, client: ServerLink, work: Workload | None = None) -> None:
        self.spec, self.rank, self.client = spec, rank, client
        self.phase = Phase()
        self._prepared = work

    def run(self) -> WorkerResult:
        try:
            return self._run()
        except WorkerFailure:
            raise
        except Exception as e:
            raise self.phase.failure(e) from e

    def _run(self) -> WorkerResult:
        rank, spec, phase = self.rank, self.spec, self.phase
        assert spec.local_steps is not None
        work = self._prepared or Workload.build(spec, rank)
        model, total, h = work.model, work.total, spec.local_steps
        rounds = spec.rounds(total)
        flat = FlatModel(model)
        optimizer = work.build_optimizer()  # the inner one: over the model, whose parameters are views of flat
        scheduler = build_scheduler(optimizer, spec.lr_schedule.to_dict(), max(total, 1))
        trainable = [p for p in model.parameters() if p.requires_grad]
        send_buffers = bool(flat.buffers) and (rank == 0 or spec.buffers == "average")
        take_buffers = bool(flat.buffers) and spec.buffers != "local"

        reg = self.client.register(socket.gethostname(), os.getpid(), rounds, work.train_size)
        if reg.needs_init:
            self.client.init_parameters(flat.state, flat.params.detach().cpu(), flat.frozen_flat(),
                                        flat.buffer_values())
        round_ = reg.next_step
        if round_ and scheduler is not None:  # a restart: the schedule goes on where the job is
            for _ in range(min(round_ * h, total)):
                scheduler.step()
        result = WorkerResult(rank=rank, steps_run=0)
        meter = Meter(work.device)
        # a round's traffic: the pseudo-gradient out and the parameters in, in the wire dtype
        round_bytes = 2 * flat.layout.numel * torch_dtype(self.client.wire_dtype).itemsize

        def received(pulled: Pulled) -> int:
            if take_buffers:
                flat.load_buffers(pulled.buffers)
            return pulled.version

        with Heartbeat(self.client, reg.heartbeat_interval_s) as beat:
            version = received(self.client.pull(flat.layout, round_, flat.params)) if round_ < rounds else 0
            while round_ < rounds:
                if beat.stop_reason is not None:
                    result.stopped = beat.stop_reason
                    return result
                start = round_ * h
                if start > 0 and any(work.eval_due(s) for s in range(start - h + 1, start + 1)):
                    phase.at("eval", start)
                    self.client.report(start, "eval", work.evaluate())
                global_params = flat.params.detach().clone()
                for step in range(start, min(start + h, total)):
                    phase.at("train", step)
                    loss, samples = work.gradient(step, model, flat.zero_grad, lambda: [flat.grads])
                    unused = set(flat.unused())
                    for i, p in enumerate(trainable):  # as torch.optim: no gradient, no update
                        if i in unused:
                            p.grad = None
                    clip_gradients(trainable, spec.clip_grad_norm)
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    flat.gather_grads()  # the gradients' views back where backward accumulates
                    meter.add(loss, samples)
                    beat.step = step + 1
                    result.steps_run += 1
                phase.at("push", round_)
                pseudo = global_params.sub_(flat.params.detach())  # global - local, in place
                buffers = flat.buffer_values() if send_buffers else None
                sent = time.perf_counter()
                if round_ + 1 < rounds or rank == 0:
                    version = received(self.client.push_pull(flat.layout, round_, version, pseudo, flat.params,
                                                              buffers))
                else:
                    self.client.push(flat.layout, round_, version, pseudo, buffers)
                meter.add_comm(time.perf_counter() - sent)
                round_ += 1
                if (metrics := meter.due(round_ == rounds)) is not None:
                    self.client.report(round_, "train", {**metrics, "lr": float(optimizer.param_groups[0]["lr"]),
                                                         "bytes_per_round": float(round_bytes)})
            if rank == 0:
                if result.steps_run == 0:  # resumed at the end: fetch the final parameters
                    received(self.client.pull(flat.layout, rounds, flat.params))
                if work.val is not None:
                    phase.at("eval", total)
                    result.metrics = work.evaluate()
                    self.client.report(rounds, "eval", result.metrics)
        return result

