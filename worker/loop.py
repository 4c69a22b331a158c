"""A worker's training loop in the parameter-server modes (plain Python; the Ray actor wraps it).

Step t of rank r trains on ``worker_batch_indices(n, b, N, r, seed, t)``: a pure
function of (seed, rank, world size, step). A restarted worker therefore resumes
at the step the server says and recomputes exactly the gradient it owed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Self

import torch

from gradhub.client.spec import JobSpec
from gradhub.worker.data import (
    build_datasets,
    build_loss,
    evaluate,
    get_batch,
    worker_batch_indices,
)
from gradhub.worker.flat import FlatModel
from gradhub.worker.models import seeded_model
from gradhub.worker.ps_client import PSClient

log = logging.getLogger(__name__)

REPORT_EVERY_S = 0.5


@dataclass
class WorkerResult:
    rank: int
    steps_run: int
    stopped: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def pick_device(spec: JobSpec) -> torch.device:
    """CUDA when the job asks for GPUs and one is visible, else CPU."""
    if spec.resources.gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError("resources.gpus: the job asks for GPUs but this worker sees no CUDA device")
        return torch.device("cuda", 0)
    return torch.device("cpu")


class Heartbeat:
    """Background heartbeats; sets ``stop_reason`` when the server says the job is over."""

    def __init__(self, client: PSClient, interval: float) -> None:
        self.step = 0
        self.stop_reason: str | None = None
        self._client, self._interval = client, max(interval, 0.1)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradhub-heartbeat", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            try:
                reason = self._client.heartbeat(self.step)
            except Exception as e:  # noqa: BLE001 - the training loop sees real failures
                log.warning("heartbeat failed: %s", e)
                continue
            if reason is not None:
                self.stop_reason = reason
                return


class Meter:
    """Training loss and throughput over windows of ``REPORT_EVERY_S``, and over the whole run.

    The loss stays on the device between reports: no host sync per step."""

    def __init__(self, device: torch.device) -> None:
        self._loss = torch.zeros((), device=device)
        self._samples, self._run_samples = 0, 0
        self._start = self._run_start = time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self._loss += loss.detach() * samples
        self._samples += samples
        self._run_samples += samples

    def due(self, last: bool) -> dict[str, float] | None:
        """The window's metrics when it is time to report (or ``last``), else None."""
        now = time.perf_counter()
        elapsed = now - self._start
        if (elapsed < REPORT_EVERY_S and not last) or not self._samples:
            return None
        out = {"loss": float(self._loss) / self._samples, "samples_per_s": self._samples / elapsed,
               "avg_samples_per_s": self._run_samples / (now - self._run_start)}
        self._loss.zero_()
        self._samples, self._start = 0, now
        return out


class PSTrainer:
    """Runs one worker of a ps-* job against a parameter server."""

    def __init__(self, spec: JobSpec, rank: int, client: PSClient) -> None:
        self.spec, self.rank, self.client = spec, rank, client

    def run(self) -> WorkerResult:
        spec, rank = self.spec, self.rank
        device = pick_device(spec)
        model = seeded_model(spec.seed, spec.model.name, spec.model.factory, spec.model.args).to(device)
        flat = FlatModel(model)
        train, val = build_datasets(spec.dataset.name, spec.dataset.factory, spec.dataset.args, spec.val_fraction)
        loss_fn = build_loss(spec.loss.name, spec.loss.factory, spec.loss.args)
        n = len(train)  # type: ignore[arg-type]
        total = spec.total_steps(n)

        reg = self.client.register(socket.gethostname(), os.getpid(), total, n)
        if reg.needs_init:
            self.client.init_parameters(flat.layout, flat.params.detach().cpu())
        step = reg.next_step
        result = WorkerResult(rank=rank, steps_run=0)
        meter = Meter(device)
        with Heartbeat(self.client, reg.heartbeat_interval_s) as beat:
            version = self.client.pull(flat.layout, step, flat.params) if step < total else 0
            while step < total:
                if beat.stop_reason is not None:
                    result.stopped = beat.stop_reason
                    return result
                if rank == 0 and spec.eval_every and step and step % spec.eval_every == 0 and val is not None:
                    self.client.report(step, "eval", evaluate(model, val, loss_fn, device))
                idx = worker_batch_indices(n, spec.batch_size, spec.workers, rank, spec.seed, step)
                x, y = get_batch(train, idx)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                flat.zero_grad()
                loss = loss_fn(model(x), y)
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
                meter.add(loss, len(idx))
                if (metrics := meter.due(step == total)) is not None:
                    self.client.report(step, "train", metrics)
            if rank == 0:
                if result.steps_run == 0:  # resumed at the end: fetch the final parameters
                    self.client.pull(flat.layout, total, flat.params)
                if val is not None:
                    result.metrics = evaluate(model, val, loss_fn, device)
                    self.client.report(total, "eval", result.metrics)
        return result
