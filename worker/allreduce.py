"""A worker's training loop in allreduce mode (plain Python; the Ray actor wraps it).

The job's workers form a torch.distributed group and train the model wrapped in PyTorch's
DistributedDataParallel, which averages gradients in buckets while backward runs. Every
worker runs the same optimizer on the same averaged gradients, so all hold the same
parameters; the server sees registrations, heartbeats, metrics and rank 0's checkpoints.

Step t of rank r trains on the same samples as in ps-sync (``worker_batch_indices``), so a job
gives the same parameters as ps-sync and as single-process PyTorch on the global batches.

A worker lives through as many groups (generations) as the job needs. When a peer is lost,
the survivors keep their processes and their state: each rolls back the step in flight (its
parameters are untouched until the optimizer runs; its buffers come back from a copy taken at
the step's start) and asks the server to join the next group. The restarted worker asks too;
the new group starts from the survivor that got furthest, which broadcasts its state to all.
A group whose members all start fresh (a new job, a server restart) loads the checkpoint.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Self

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gradhub.proto.contract.errors import (
    PeerLostError,
    ProtocolError,
    ResourceExhaustedError,
    StateError,
    WorkerFailure,
)
from gradhub.proto.contract.optim import (
    build_scheduler,
    clip_gradients,
    optimizer_state_copy,
)
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.state import TrainingState
from gradhub.proto.v1 import ps_pb2
from gradhub.worker.collective import (
    COMPRESSION,
    AllReduceHook,
    ProcessGroup,
    backend_for,
    broadcast_state,
    is_collective_failure,
    one_line,
)
from gradhub.worker.data import call_model, split_batch
from gradhub.worker.precision import no_sync_except_last
from gradhub.worker.server_link import ServerLink
from gradhub.worker.workload import Heartbeat, Meter, Phase, WorkerResult, Workload

log = logging.getLogger(__name__)

# A worker gives up (its run ends with PeerLostError, and the server restarts the whole group)
# after this many groups in a row broke before it finished a step.
MAX_REJOINS = 5


def capture(step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> TrainingState:
    """A copy of the training state on the host (training may go on while it is sent): the
    model's whole ``state_dict`` (tied keys included), optimizer and schedule state."""
    return TrainingState(
        step=step,
        params={n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()},
        optimizer_state=optimizer_state_copy(optimizer),
        scheduler_state=None if scheduler is None else scheduler.state_dict(),
    )


def restore(state: TrainingState, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> None:
    """Load a checkpoint into freshly built objects; the model must have the same state keys."""
    expected = model.state_dict()
    if expected.keys() != state.params.keys():
        raise ProtocolError(f"params: the checkpoint holds {sorted(state.params)}, the model has {sorted(expected)}")
    for name, t in expected.items():
        if t.shape != state.params[name].shape:
            raise ProtocolError(f"params: '{name}' is {list(t.shape)} in the model but "
                                f"{list(state.params[name].shape)} in the checkpoint")
    model.load_state_dict(state.params)
    if state.optimizer_state is not None:
        optimizer.load_state_dict(state.optimizer_state)
    if scheduler is not None and state.scheduler_state is not None:
        scheduler.load_state_dict(state.scheduler_state)


class _Uploader:
    """Sends rank 0's checkpoints in a background thread, one at a time, so training goes on
    while they travel. A failed upload is raised at the next ``save`` or at ``close``."""

    def __init__(self, client: ServerLink) -> None:
        self._client = client
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: TrainingState, final: bool = False) -> None:
        """Upload ``state``; a periodic one that the server cannot write is skipped, the
        ``final`` one must be written."""
        self.wait()
        self._thread = threading.Thread(target=self._send, args=(state, final), name="gradhub-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _send(self, state: TrainingState, final: bool) -> None:
        try:
            self._client.save_checkpoint(state)
        except ResourceExhaustedError as e:
            if final:
                self._error = e
            else:  # the server could not write it (a full disk): the next checkpoint tries again
                log.warning("checkpoint at step %d not kept by the server (%s); training goes on", state.step, e)
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._thread.join()


@contextmanager
def collectives(rank: int, step: int) -> Iterator[None]:
    """Collective failures inside the block (a peer is gone) become PeerLostErrors."""
    try:
        yield
    except Exception as e:
        if is_collective_failure(e):
            raise PeerLostError(f"worker {rank} lost its group at step {step}: {one_line(e)}") from None
        raise


class AllReduceTrainer:
    """Runs one worker of an allreduce job, through as many groups as it takes."""

    def __init__(self, spec: JobSpec, rank: int, client: ServerLink, work: Workload | None = None) -> None:
        self.spec, self.rank, self.client = spec, rank, client
        self._prepared = work  # a workload built ahead (a spare's), else built at the start of the run
        self.phase = Phase()
        self._keep: Callable[[int], None] | None = None  # rank 0: sends the state of a whole step
        self.held: int | None = None  # the step whose whole state this process holds (None: none)
        self._buffers: list[torch.Tensor] = []  # the buffers at the start of the step in flight
        self._live_buffers: list[torch.Tensor] = []  # the model's buffers
        self._groups: list[DistributedDataParallel] = []  # never freed: see _train
        self._formed_at = 0  # the step the current group started at

    def run(self) -> WorkerResult:
        """Train to the end. On its own failure, rank 0 first sends its state (it holds the
        job's state after its last whole step), so the job keeps it; the error is raised as a
        WorkerFailure naming the phase and step."""
        try:
            return self._run()
        except BaseException as e:
            own = isinstance(e, Exception) and not isinstance(e, PeerLostError | WorkerFailure)
            failure = self.phase.failure(e) if own else None
            self._rollback()  # a failure inside a step: its buffers as they were at its start
            if self._keep is not None and self.phase.consistent and self.phase.step > 0:
                try:
                    self._keep(self.phase.step)
                except Exception as save_error:  # noqa: BLE001 - the original error matters more
                    log.warning("could not send the state of step %d: %s", self.phase.step, save_error)
            if failure is None:
                raise
            raise failure from e

    def _run(self) -> WorkerResult:
        spec, rank = self.spec, self.rank
        work = self._prepared or Workload.build(spec, rank)
        model, device, total = work.model, work.device, work.total
        optimizer = work.build_optimizer()
        scheduler = build_scheduler(optimizer, spec.lr_schedule.to_dict(), max(total, 1))

        reg = self.client.register(socket.gethostname(), os.getpid(), total, work.train_size)
        result = WorkerResult(rank=rank, steps_run=0)
        backend = backend_for(device, spec.resources.gpus)
        timeout = reg.collective_timeout_s or 120.0
        with Heartbeat(self.client, reg.heartbeat_interval_s) as beat, _Uploader(self.client) as uploader:
            if rank == 0:
                def keep(step: int) -> None:
                    uploader.save(capture(step, model, optimizer, scheduler))
                    uploader.wait()
                self._keep = keep
            stalled, lost_at = 0, None  # groups lost in a row at the same step, and that step
            while True:
                group = self._join(beat)
                if group is not None and group.released:
                    log.info("worker %d leaves: the job runs on fewer workers now", rank)
                    result.released, result.stopped = True, "the job shrank below this worker's rank"
                    return result
                if group is None or group.finished:
                    if group is not None and group.keep_state and self._keep is not None and self.held:
                        self._keep(self.held)  # the job failed elsewhere: it keeps this state
                    result.stopped = beat.stop_reason if group is None else None
                    return result
                step = group.step
                if group.source_rank < 0 and step > 0 and self.held != step:
                    state = self.client.load_checkpoint()
                    if state.step != step:
                        raise ProtocolError(f"step: the group starts at step {step} but the server sent "
                                            f"the state of step {state.step}")
                    restore(state, model, optimizer, scheduler)
                    self.held = step
                elif group.source_rank < 0:
                    self.held = step  # step 0: every member starts from the model as built
                try:
                    with ProcessGroup((self.client.host, group.store_port, group.store_prefix), group.group_rank,
                                      group.world_size, backend, timeout):
                        if group.source_rank >= 0:
                            self._take_state(group.source_rank, step, model, optimizer, scheduler, device)
                        work.resize(group.group_rank, group.world_size)
                        beat.regroup = False  # until a heartbeat says this group should re-form
                        if self._train(work, optimizer, scheduler, step, result, beat, uploader):
                            return result
                    stalled = 0  # the group re-forms to change its size: join the next one
                    log.info("worker %d: the group re-forms at step %s to change its size", rank, self.held)
                except PeerLostError as e:
                    self._rollback()
                    stalled = stalled + 1 if self.held == lost_at else 1
                    lost_at = self.held
                    if stalled > MAX_REJOINS:  # groups keep breaking before a step is done: give up
                        raise PeerLostError(f"{e}; {stalled} groups in a row lost a member before any step "
                                            "was done") from None
                    log.warning("%s; joining the next group with the state of step %s", e, self.held)

    def _join(self, beat: Heartbeat) -> ps_pb2.JoinGroupResponse | None:
        """Ask the server for the next group until it forms; None when the job is over."""
        while beat.stop_reason is None:
            try:
                group = self.client.join_group(self.held)
            except StateError as e:  # the job ended while this worker waited
                beat.stop_reason = beat.stop_reason or str(e)
                return None
            if group.ready:
                return group
            time.sleep(group.retry_after_s)  # the server's pacing, while the others arrive
        return None

    def _take_state(self, source: int, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, device: torch.device) -> None:
        """Every member takes the state of the group's ``source`` rank (which holds ``step``)."""
        mine = torch.distributed.get_rank() == source
        if not mine:
            self.held = None  # until the state is in whole, this worker holds none
        with collectives(self.rank, step):
            state = broadcast_state(capture(step, model, optimizer, scheduler) if mine else None, source, device)
        if not mine:
            restore(state, model, optimizer, scheduler)
            self.held = step

    def _rollback(self) -> None:
        """After a lost peer: undo the step in flight (its parameters were not updated yet; its
        buffers come back from the copy taken at its start)."""
        if self.held is not None and self.phase.name == "train" and self._buffers:
            with torch.no_grad():
                for b, saved in zip(self._live_buffers, self._buffers, strict=True):
                    b.copy_(saved)
        self._buffers = []

    def _train(self, work: Workload, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None, step: int, result: WorkerResult,
               beat: Heartbeat, uploader: _Uploader) -> bool:
        """Train from ``step`` to the end in the current group; rank 0 saves the final state, and
        nobody leaves before it is saved. False when the group stopped early to re-form (an
        elastic job changes its size: the members agree on it at a step boundary)."""
        spec, rank, phase = self.spec, self.rank, self.phase
        model, device, total = work.model, work.device, work.total
        params = [p for p in model.parameters() if p.requires_grad]
        self._live_buffers = list(model.buffers())
        self._formed_at = step  # a group that just formed trains a step before it may re-form
        phase.at("train", step)
        with collectives(rank, step):
            ddp = self._wrap(model, device, work, step)
        hook = AllReduceHook(COMPRESSION[spec.compression])
        ddp.register_comm_hook(None, hook.hook)
        # Every group's DDP lives as long as this process. Freeing a broken one deadlocks:
        # the Reducer's destructor (run with the GIL held) destroys the Gloo process group,
        # which joins its threads, and the thread that failed the all-reduce waits for the GIL
        # to run the hook's Python callback. The cost: one set of gradient buckets per group.
        self._groups.append(ddp)
        no_sync = no_sync_except_last(ddp, spec.accumulate)
        meter = Meter(device)
        comm_s, comm_steps = 0.0, 0
        while step < total:
            if beat.stop_reason is not None:
                result.stopped = beat.stop_reason
                return True
            if spec.elastic and step > self._formed_at:
                with collectives(rank, step):  # every member leaves at the same step, or none does
                    if any_rank(beat.regroup, device):
                        return False
            if work.eval_due(step):
                phase.at("eval", step)
                self.client.report(step, "eval", work.evaluate())
            phase.at("train", step)
            self._buffers = [b.detach().clone() for b in self._live_buffers]
            with collectives(rank, step):
                # DDP averages the gradients over the group in the last micro-batch's backward
                loss, samples = work.gradient(step, ddp, optimizer.zero_grad,
                                              lambda: [p.grad for p in params if p.grad is not None], no_sync)
                if spec.buffers == "average":
                    average_buffers(model, torch.distributed.get_world_size())
                elif spec.buffers == "broadcast":
                    # rank 0's buffers on every rank at every step boundary (what DDP would
                    # broadcast at the next forward, sent now): whichever worker the group
                    # re-forms from after a loss holds the job's buffers
                    broadcast_buffers(model)
            phase.at("optimizer", step)
            clip_gradients(params, spec.clip_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            self.held, self._buffers = step, []
            phase.at("train", step)
            beat.step = step
            result.steps_run += 1
            step_comm_s = hook.take_seconds()
            comm_s += step_comm_s
            comm_steps += 1
            if rank == 0 and spec.checkpoint_every and step % spec.checkpoint_every == 0 and step < total:
                uploader.save(capture(step, model, optimizer, scheduler))
            meter.add(loss, samples, step_comm_s)
            if (metrics := meter.due(step == total)) is not None:
                metrics["allreduce_s"] = comm_s / max(comm_steps, 1)
                metrics["lr"] = float(optimizer.param_groups[0]["lr"])
                comm_s, comm_steps = 0.0, 0
                self.client.report(step, "train", metrics)
        self._buffers = []
        if rank == 0:
            phase.at("checkpoint", total)
            uploader.save(capture(total, model, optimizer, scheduler), final=True)  # the final state
            uploader.wait()
            self._keep = None  # the final state is kept: a failure from here on loses nothing
            if work.val is not None:
                phase.at("eval", total)
                result.metrics = work.evaluate()
                self.client.report(total, "eval", result.metrics)
        with collectives(rank, total):
            torch.distributed.barrier()  # a member lost before the final state is saved re-forms the group
        return True


    def _wrap(self, model: nn.Module, device: torch.device, work: Workload, step: int) -> DistributedDataParallel:
        """DDP with its defaults (25 MiB buckets, buffers broadcast from rank 0 unless the job
        keeps them otherwise); gradients live in the buckets, so averaging copies nothing.
        SyncBatchNorm when the job asks; unused parameters looked for when the job says so or
        when any rank's first step leaves a parameter without a gradient."""
        spec = self.spec
        if spec.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        find_unused = spec.find_unused_parameters
        if find_unused is None:
            find_unused = any_rank(has_unused_parameters(work, step), device)
        ids = [device.index] if device.type == "cuda" else None
        # buffers: "broadcast" sends rank 0's after each step (``broadcast_buffers``) rather than
        # before each forward, as DDP would: the same values, there at the step boundary. Newer
        # torch deprecates ``broadcast_buffers`` for ``forward_sync_buffers``, which still syncs
        # buffers at init (a worker that resumes its own buffers, ``buffers: local``, must keep
        # them): torch's warning says to keep ``broadcast_buffers=False`` for that, so it is not shown
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
            return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                           broadcast_buffers=False, find_unused_parameters=find_unused)


def has_unused_parameters(work: Workload, step: int) -> bool:
    """Whether a trainable parameter gets no gradient from this worker's first micro-batch of
    ``step``: a forward and backward on the plain model whose effects (gradients, buffers) are
    undone."""
    model = work.model
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    x, y = work.batch(step)
    x0, y0 = split_batch(x, work.spec.accumulate)[0], split_batch(y, work.spec.accumulate)[0]
    with work.precision.autocast():
        loss = work.loss_fn(call_model(model, x0), y0)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    unused = any(p.grad is None for p in trainable)
    with torch.no_grad():
        for p in trainable:
            p.grad = None
        for n, b in model.named_buffers():
            b.copy_(saved[n])
    return unused


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank of the group."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def broadcast_buffers(model: nn.Module) -> None:
    """``buffers: broadcast``: every rank takes rank 0's buffers, one broadcast per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in model.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    with torch.no_grad():
        for buffers in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            torch.distributed.broadcast(flat, src=0)
            offset = 0
            for b in buffers:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()


def average_buffers(model: nn.Module, world_size: int) -> None:
    """``buffers: average``: every floating buffer becomes the mean over the group."""
    for b in model.buffers():
        if b.dtype.is_floating_point:
            torch.distributed.all_reduce(b)
            b.div_(world_size)
