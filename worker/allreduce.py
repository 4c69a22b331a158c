"""A worker's training loop in allreduce mode (plain Python; the Ray actor wraps it).

The job's workers form a torch.distributed group and train the model wrapped in PyTorch's
DistributedDataParallel, which averages gradients in buckets while backward runs. Every
worker runs the same optimizer on the same averaged gradients, so all hold the same
parameters; the server sees registrations, heartbeats, metrics and rank 0's checkpoints.

Step t of rank r trains on the same samples as in ps-sync (``worker_batch_indices``), and a
restarted group loads the latest checkpoint and goes on from its step, so a job gives the
same parameters as ps-sync and as single-process PyTorch on the global batches.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Self

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gradhub.client.errors import PeerLostError, ProtocolError
from gradhub.client.spec import JobSpec
from gradhub.proto.state import TrainingState
from gradhub.server.optim import build_optimizer, build_scheduler, optimizer_state_copy
from gradhub.worker.collective import (
    COMPRESSION,
    AllReduceHook,
    ProcessGroup,
    backend_for,
    is_collective_failure,
    one_line,
)
from gradhub.worker.ps_client import PSClient
from gradhub.worker.workload import Heartbeat, Meter, WorkerResult, Workload

log = logging.getLogger(__name__)


def capture(step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> TrainingState:
    """A copy of the training state on the host (training may go on while it is sent)."""
    return TrainingState(
        step=step,
        params={n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()},
        optimizer_state=optimizer_state_copy(optimizer),
        scheduler_state=None if scheduler is None else scheduler.state_dict(),
    )


def restore(state: TrainingState, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> None:
    """Load a checkpoint into freshly built objects; the model must have the same parameters."""
    named = dict(model.named_parameters())
    if named.keys() != state.params.keys():
        raise ProtocolError(f"params: the checkpoint holds {sorted(state.params)}, the model has {sorted(named)}")
    with torch.no_grad():
        for name, p in named.items():
            if p.shape != state.params[name].shape:
                raise ProtocolError(f"params: '{name}' is {list(p.shape)} in the model but "
                                    f"{list(state.params[name].shape)} in the checkpoint")
            p.copy_(state.params[name])
    if state.optimizer_state is not None:
        optimizer.load_state_dict(state.optimizer_state)
    if scheduler is not None and state.scheduler_state is not None:
        scheduler.load_state_dict(state.scheduler_state)


class _Uploader:
    """Sends rank 0's checkpoints in a background thread, one at a time, so training goes on
    while they travel. A failed upload is raised at the next ``save`` or at ``close``."""

    def __init__(self, client: PSClient) -> None:
        self._client = client
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: TrainingState) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._send, args=(state,), name="gradhub-checkpoint", daemon=True)
        self._thread.start()

    def _send(self, state: TrainingState) -> None:
        try:
            self._client.save_checkpoint(state)
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


class AllReduceTrainer:
    """Runs one worker of an allreduce job; ``rendezvous`` is rank 0's (address, port)."""

    def __init__(self, spec: JobSpec, rank: int, client: PSClient, rendezvous: tuple[str, int],
                 store: torch.distributed.TCPStore | None = None) -> None:
        self.spec, self.rank, self.client = spec, rank, client
        self.rendezvous, self._store = rendezvous, store

    def run(self) -> WorkerResult:
        spec, rank = self.spec, self.rank
        work = Workload.build(spec, rank)
        model, device, total = work.model, work.device, work.total
        optimizer = build_optimizer(list(model.parameters()), spec.optimizer.name, spec.optimizer.lr,
                                    spec.optimizer.hyper)
        scheduler = build_scheduler(optimizer, spec.lr_schedule.to_dict(), max(total, 1))

        reg = self.client.register(socket.gethostname(), os.getpid(), total, work.train_size)
        step = reg.next_step
        if step > 0:
            state = self.client.load_checkpoint()
            if state.step != step:
                raise ProtocolError(f"step: the server resumes at step {step} but sent the state of step {state.step}")
            restore(state, model, optimizer, scheduler)
        result = WorkerResult(rank=rank, steps_run=0)
        backend = backend_for(device, spec.resources.gpus)
        timeout = reg.collective_timeout_s or 120.0
        with (ProcessGroup(self.rendezvous, rank, spec.workers, backend, timeout, self._store),
              Heartbeat(self.client, reg.heartbeat_interval_s) as beat, _Uploader(self.client) as uploader):
            ddp = self._wrap(model, device)
            hook = AllReduceHook(COMPRESSION[spec.compression])
            ddp.register_comm_hook(None, hook.hook)
            meter = Meter(device)
            comm_s, comm_steps = 0.0, 0
            while step < total:
                if beat.stop_reason is not None:
                    result.stopped = beat.stop_reason
                    return result
                if work.eval_due(step):
                    self.client.report(step, "eval", work.evaluate())
                x, y = work.batch(step)
                optimizer.zero_grad()
                try:
                    loss = work.loss_fn(ddp(x), y)
                    loss.backward()  # DDP averages the gradients over the group here
                except Exception as e:
                    if is_collective_failure(e):
                        raise PeerLostError(f"worker {rank} lost its group at step {step}: {one_line(e)}") from None
                    raise
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step += 1
                beat.step = step
                result.steps_run += 1
                comm_s += hook.take_seconds()
                comm_steps += 1
                if rank == 0 and spec.checkpoint_every and step % spec.checkpoint_every == 0 and step < total:
                    uploader.save(capture(step, model, optimizer, scheduler))
                meter.add(loss, len(x))
                if (metrics := meter.due(step == total)) is not None:
                    metrics["allreduce_s"] = comm_s / max(comm_steps, 1)
                    comm_s, comm_steps = 0.0, 0
                    self.client.report(step, "train", metrics)
            if rank == 0:
                uploader.save(capture(total, model, optimizer, scheduler))  # the final state
                uploader.wait()
                if work.val is not None:
                    result.metrics = work.evaluate()
                    self.client.report(total, "eval", result.metrics)
        return result

    def _wrap(self, model: nn.Module, device: torch.device) -> DistributedDataParallel:
        """DDP with its defaults (25 MiB buckets, buffers broadcast from rank 0); gradients
        live in the buckets, so averaging copies nothing."""
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
