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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple, Self

import torch

from gradhub.proto.codec import Layout, torch_dtype
from gradhub.proto.contract.optim import build_scheduler, clip_gradients
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.state import TrainingState
from gradhub.worker.flat import FlatModel
from gradhub.worker.loop import Joined, PSTrainer
from gradhub.worker.server_link import Pulled, ServerLink
from gradhub.worker.sync_schedule import SyncSchedule
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
        flat = FlatModel(model)
        optimizer = work.build_optimizer()  # the inner one: over the model, whose parameters are views of flat
        scheduler = build_scheduler(optimizer, spec.lr_schedule.to_dict(), max(total, 1))
        trainable = [p for p in model.parameters() if p.requires_grad]
        schedule = SyncSchedule(h, spec.fragments or 1, spec.fragment_overlap or 0, total)
        syncs = schedule.syncs
        joined = Joined.register(self.client, flat, work, syncs)
        reg = joined.reg
        rounds = _Rounds(self.client, joined, flat, _Inner(work, flat, optimizer, scheduler, trainable, spec),
                         schedule, spec.fragment_mix or 0.0)
        result = WorkerResult(rank=rank, steps_run=0)
        meter = Meter(work.device)
        # a round's traffic: the pseudo-gradient out (quantised: codes and scales) and the parameters in
        round_bytes = sum(self.client.encoder.push_bytes(f.layout.numel) for f in rounds.fragments) + \
            flat.layout.numel * torch_dtype(self.client.params_dtype).itemsize
        sync = reg.next_step

        with Heartbeat(self.client, reg.heartbeat_interval_s) as beat, rounds:
            if sync >= syncs:
                pass
            elif sync and spec.outer_sync:  # a restart: back to the state this worker had
                self._replay(rounds, sync)
            else:  # the job's start, or async: the global model as it is now
                rounds.start(sync)
                if sync and scheduler is not None:  # async: the schedule goes on where the job is
                    for _ in range(rounds.step):
                        scheduler.step()

            def keep(label: int) -> None:  # what a restart of this worker replays from
                if spec.outer_sync and spec.checkpoint_every and 0 < label < syncs and label % spec.checkpoint_every == 0:
                    phase.at("checkpoint", rounds.step)
                    self.client.save_checkpoint(rounds.state(label))

            def train(step: int) -> None:
                if step and step % h == 0 and any(work.eval_due(s) for s in range(step - h + 1, step + 1)):
                    phase.at("eval", step)
                    self.client.report(step, "eval", work.evaluate())
                phase.at("train", step)
                meter.add(*rounds.inner.step(step))
                beat.step = step + 1
                result.steps_run += 1

            for s in range(sync, syncs):
                if beat.stop_reason is not None:
                    result.stopped = beat.stop_reason
                    return result
                rounds.advance(schedule.boundary(s), train)
                phase.at("push", s)
                sent = time.perf_counter()
                rounds.push(s, pull=s + 1 < syncs or rank == 0)  # the last push: its values are the server's result
                keep(s + 1)
                meter.add_comm(time.perf_counter() - sent)
                if schedule.fragment(s) == schedule.fragments - 1 and \
                        (metrics := meter.due(s + 1 == syncs)) is not None:
                    self.client.report(s + 1, "train", {**metrics, "lr": float(optimizer.param_groups[0]["lr"]),
                                                        "bytes_per_round": float(round_bytes)})
            rounds.settle()
            if rank == 0:
                if result.steps_run == 0 or not rounds.is_global:  # the job's final parameters
                    joined.received(self.client.pull(flat.layout, syncs, flat.params))
                if work.val is not None:
                    phase.at("eval", total)
                    result.metrics = work.evaluate()
                    self.client.report(syncs, "eval", result.metrics)
        return result

    def _replay(self, rounds: _Rounds, sync: int) -> None:
        """Rebuild the state this worker had when it pushed sync ``sync - 1``: from its latest
        kept state, each sync since is trained again, its global values taken from what the
        store kept (``global.<version>``), which gives the same state bit for bit. The last
        one's values come from the server as they would have."""
        self.phase.at("replay", rounds.schedule.boundary(sync - 1))
        state = self.client.load_checkpoint()
        rounds.restore(state)
        for s in range(state.step, sync):
            rounds.advance(rounds.schedule.boundary(s), lambda step: rounds.inner.step(step))
            kept = state.params.get(f"global.{s + 1}")
            rounds.replayed(s, kept)
        log.info("worker %d: replayed syncs %d to %d to go on at sync %d", self.rank, state.step, sync - 1, sync)


class _Fragment(NamedTuple):
    layout: Layout  # the fragment's tensors, as a layout of their own
    first: int | None  # its first tensor in the model (None: the whole model)
    start: int  # where it starts in the flat vector
    stop: int


class _Exchange(NamedTuple):
    sync: int
    merge_at: int
    incoming: torch.Tensor  # the fragment's new global values land here
    done: Future[Pulled] | Pulled | None  # the push-pull (on the exchange thread), or None: ``incoming`` holds them


class _Rounds:
    """A local-sgd worker's model between syncs: its own parameters (``flat.params``), the
    global values it last received for each fragment (``global_``: what its pseudo-gradients
    are measured from), the inner steps taken, and the one exchange in flight. Fragments'
    exchanges run on a thread of their own while training goes on."""

    def __init__(self, client: ServerLink, joined: Joined, flat: FlatModel, inner: _Inner, schedule: SyncSchedule,
                 mix: float) -> None:
        self.client, self.joined, self.flat, self.inner, self.schedule, self.mix = \
            client, joined, flat, inner, schedule, mix
        layout = flat.layout
        parts = layout.partition(schedule.fragments) if schedule.fragments > 1 else ((0, 0),)
        self.fragments = []
        for first, count in parts:
            part, start = layout.part(first, count), layout.offset(first)
            self.fragments.append(_Fragment(part, None if count == 0 else first, start, start + part.numel))
        self.global_ = flat.params.detach().clone()
        self.step = 0
        self.version = 0
        self._pending: _Exchange | None = None
        self._pool: ThreadPoolExecutor | None = None

    @property
    def is_global(self) -> bool:
        """Whether this worker's model is the global one after its last merge (one fragment,
        merged without mixing)."""
        return len(self.fragments) == 1 and self.mix == 0

    def __enter__(self) -> Self:
        if self.schedule.overlap:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="gradhub-exchange")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:  # not waited for: after a failure an exchange may wait on the server
            self._pool.shutdown(wait=False, cancel_futures=True)

    def start(self, sync: int) -> None:
        """Begin at ``sync`` (0, or an async job's) with the global model as it is now."""
        self.version = self.joined.received(self.client.pull(self.flat.layout, sync, self.flat.params))
        self.global_.copy_(self.flat.params.detach())
        self.step = self.schedule.boundary(sync - 1) if sync else 0

    def advance(self, to: int, train: Callable[[int], object]) -> None:
        """Train up to ``to`` inner steps done, merging the exchange in flight when it is due;
        at ``to`` every earlier exchange is merged."""
        while self.step < to:
            if self._pending is not None and self._pending.merge_at <= self.step:
                self._merge()
            train(self.step)
            self.step += 1
        if self._pending is not None:
            self._merge()

    def push(self, sync: int, pull: bool) -> None:
        """Push ``sync``'s pseudo-gradient (its fragment's ``global - local``) and, with
        ``pull``, receive its new global values, merged when the next ``advance`` reaches
        ``merge_at`` (``overlap`` steps on; at once without overlap). The exchange runs on the
        exchange thread when there is an overlap to hide it behind."""
        f = self.fragments[self.schedule.fragment(sync)]
        params = self.flat.params.detach()
        pseudo = self.global_[f.start:f.stop] - params[f.start:f.stop]
        buffers = self.flat.buffer_values() if self.joined.send_buffers else None
        if not pull:
            self.client.push(f.layout, sync, self.version, pseudo, buffers, first=f.first)
            return
        incoming = torch.empty_like(pseudo)
        base = self.version

        def exchange() -> Pulled:
            return self.client.push_pull(f.layout, sync, base, pseudo, incoming, buffers, first=f.first)

        done = exchange() if self._pool is None else self._pool.submit(exchange)
        self._pending = _Exchange(sync, self.schedule.merge_at(sync), incoming, done)

    def settle(self) -> None:
        """The end: merge what is still in flight."""
        if self._pending is not None:
            self._merge()

    def _merge(self) -> None:
        """Local values of the fragment become ``mix * local + (1 - mix) * global``."""
        ex, self._pending = self._pending, None
        assert ex is not None
        pulled = ex.done.result() if isinstance(ex.done, Future) else ex.done  # raises the exchange's failure
        if pulled is not None:
            self.version = max(self.version, self.joined.received(pulled))
        f = self.fragments[self.schedule.fragment(ex.sync)]
        with torch.no_grad():
            local = self.flat.params[f.start:f.stop]
            if self.mix:
                local.mul_(self.mix).add_(ex.incoming, alpha=1 - self.mix)
            else:
                local.copy_(ex.incoming)
            self.global_[f.start:f.stop] = ex.incoming

    # ----------------------------------------------------------- restart
    def state(self, label: int) -> TrainingState:
        """What a restart replays from: this worker as it owes sync ``label`` (its exchange of
        ``label - 1`` not merged yet), with its own parameters unless they are the global ones."""
        inner = self.inner
        params = {} if self.is_global and self.schedule.overlap == 0 else \
            {"local": self.flat.params.detach().clone(), "global": self.global_.clone()}
        return TrainingState(step=label, params=params, optimizer_state=inner.optimizer.state_dict(),
                             scheduler_state=None if inner.scheduler is None else inner.scheduler.state_dict())

    def restore(self, state: TrainingState) -> None:
        """Take a kept state (``state.step`` 0 and nothing kept: the job's start)."""
        inner = self.inner
        if state.optimizer_state is not None:
            inner.optimizer.load_state_dict(state.optimizer_state)
        if inner.scheduler is not None and state.scheduler_state is not None:
            inner.scheduler.load_state_dict(state.scheduler_state)
        label, kept = state.step, state.params
        self.step = self.schedule.boundary(label - 1) if label else 0
        with torch.no_grad():
            if "local" in kept:
                self.flat.params.copy_(kept["local"])
                self.global_.copy_(kept["global"])
            else:  # the global model at that sync (the job's start, or a model that is the global one there)
                if f"global.{label}" in kept:
                    self.flat.params.copy_(kept[f"global.{label}"])
                else:  # kept as the last sync this worker pushed: the server has the values
                    self.version = self.joined.received(self.client.pull(self.flat.layout, label, self.flat.params))
                self.global_.copy_(self.flat.params)
        if label and "local" in kept:  # the kept state's exchange in flight
            self.replayed(label - 1, kept.get(f"global.{label}"))

    def replayed(self, sync: int, kept: torch.Tensor | None) -> None:
        """``sync``'s exchange again, without its push (the server has it): its global values
        from ``kept`` (the store's parameters at version ``sync + 1``), else from the server."""
        f = self.fragments[self.schedule.fragment(sync)]
        incoming = torch.empty(f.stop - f.start, device=self.global_.device)
        if kept is not None:
            incoming.copy_(kept.reshape(-1)[f.start:f.stop])
            done: Pulled | None = None
        else:
            done = self.client.pull(f.layout, sync + 1, incoming, f.first)
        self._pending = _Exchange(sync, self.schedule.merge_at(sync), incoming, done)


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
