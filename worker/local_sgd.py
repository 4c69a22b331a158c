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
import time

import torch

from gradhub.proto.codec import torch_dtype
from gradhub.proto.contract.optim import build_scheduler, clip_gradients
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.state import TrainingState
from gradhub.worker.flat import FlatModel
from gradhub.worker.loop import Joined, PSTrainer
from gradhub.worker.workload import Heartbeat, Meter, WorkerResult, Workload

log = logging.getLogger(__name__)


class LocalSGDTrainer(PSTrainer):
    """Runs one worker of a local-sgd job against the parameter server (``PSTrainer``'s
    construction and failure handling, its own loop)."""

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
        joined = Joined.register(self.client, flat, work, rounds)
        reg, received, send_buffers = joined.reg, joined.received, joined.send_buffers
        round_ = reg.next_step
        inner = _Inner(work, flat, optimizer, scheduler, trainable, spec)
        if round_ and spec.outer_sync:  # a restart: back to the state this worker had
            self._replay(inner, round_, h, total)
        elif round_ and scheduler is not None:  # async: the schedule goes on where the job is
            for _ in range(min(round_ * h, total)):
                scheduler.step()
        result = WorkerResult(rank=rank, steps_run=0)
        meter = Meter(work.device)
        # a round's traffic: the pseudo-gradient out (quantised: codes and scales) and the parameters in
        round_bytes = self.client.encoder.push_bytes(flat.layout.numel) + \
            flat.layout.numel * torch_dtype(self.client.params_dtype).itemsize

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
                if spec.outer_sync and spec.checkpoint_every and round_ and round_ % spec.checkpoint_every == 0:
                    phase.at("checkpoint", start)  # what a restart of this worker replays from
                    self.client.save_checkpoint(TrainingState(
                        step=round_, params={}, optimizer_state=optimizer.state_dict(),
                        scheduler_state=None if scheduler is None else scheduler.state_dict()))
                global_params = flat.params.detach().clone()
                for step in range(start, min(start + h, total)):
                    phase.at("train", step)
                    loss, samples = inner.step(step)
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

    def _replay(self, inner: _Inner, round_: int, h: int, total: int) -> None:
        """Rebuild the inner state this worker had when it started round ``round_``: from its
        latest kept state, each round since is trained again from that round's global
        parameters (as the server kept them), which gives the same state bit for bit."""
        self.phase.at("replay", round_ * h)
        state = self.client.load_checkpoint()
        if state.optimizer_state is not None:
            inner.optimizer.load_state_dict(state.optimizer_state)
        if inner.scheduler is not None and state.scheduler_state is not None:
            inner.scheduler.load_state_dict(state.scheduler_state)
        for r in range(state.step, round_):
            with torch.no_grad():
                inner.flat.params.copy_(state.params[f"global.{r}"])
            for step in range(r * h, min((r + 1) * h, total)):
                inner.step(step)
        log.info("worker %d: replayed rounds %d to %d to go on at round %d", self.rank, state.step, round_ - 1,
                 round_)


class _Inner:
    """One inner step, as plain PyTorch takes it: the gradient, no update for a parameter
    that got none, clipping, the optimizer and its schedule."""

    def __init__(self, work: Workload, flat: FlatModel, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None, trainable: list[torch.nn.Parameter],
                 spec: JobSpec) -> None:
        self.work, self.flat, self.optimizer, self.scheduler = work, flat, optimizer, scheduler
        self.trainable, self.clip = trainable, spec.clip_grad_norm

    def step(self, step: int) -> tuple[torch.Tensor, int]:
        flat = self.flat
        loss, samples = self.work.gradient(step, self.work.model, flat.zero_grad, lambda: [flat.grads])
        unused = set(flat.unused())
        for i, p in enumerate(self.trainable):  # as torch.optim: no gradient, no update
            if i in unused:
                p.grad = None
        clip_gradients(self.trainable, self.clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        flat.gather_grads()  # the gradients' views back where backward accumulates
        return loss, samples
