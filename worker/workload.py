"""What every worker does whatever the mode: build its workload from the spec (the seeded model
on its device, the data, the loss, which samples each step uses), compute a step's gradient
(seeded randomness, micro-batches, mixed precision), heartbeat to the server, and measure
its loss and throughput.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import torch
from torch import nn
from torch.utils.data import Dataset

from gradhub.proto.contract.errors import SpecError, WorkerFailure
from gradhub.proto.contract.optim import build_optimizer, parameter_groups
from gradhub.proto.contract.spec import JobSpec
from gradhub.worker.data import (
    LossFn,
    MetricFn,
    batch_len,
    build_datasets,
    build_loss,
    build_metrics,
    call_model,
    evaluate,
    get_batch,
    share_weight,
    split_batch,
    step_seed,
    to_device,
    worker_batch_indices,
)
from gradhub.worker.models import seeded_model
from gradhub.worker.precision import Precision
from gradhub.worker.server_link import ServerLink

log = logging.getLogger(__name__)

REPORT_EVERY_S = 0.5


@dataclass
class WorkerResult:
    rank: int
    steps_run: int
    stopped: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    released: bool = False  # an elastic job shrank below this worker's rank: it left


def pick_device(spec: JobSpec) -> torch.device:
    """CUDA when the job asks for GPUs and one is visible (Ray shows a worker its own), else CPU."""
    if spec.resources.gpus > 0:
        if not torch.cuda.is_available():
            raise SpecError("resources.gpus", "the job asks for GPUs but this worker sees no CUDA device")
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


@dataclass
class Workload:
    """What one worker trains, built from the spec the same way in every mode: the seeded
    model on its device, the data, the loss, and which samples each step uses."""

    spec: JobSpec
    rank: int
    device: torch.device
    model: nn.Module
    train: Dataset
    val: Dataset | None
    loss_fn: LossFn
    total: int  # steps per worker
    precision: Precision
    metrics: MetricFn | None = None
    # an elastic job: this worker's (index, count) share of the global batch now (None: the
    # job's fixed size, slice ``rank`` of ``spec.workers``)
    share: tuple[int, int] | None = None

    def resize(self, rank: int, size: int) -> None:
        """The job runs on ``size`` workers now (an elastic job): this worker takes share
        ``rank`` of ``size`` of each global batch."""
        self.share = None if size == self.spec.workers else (rank, size)

    @classmethod
    def build(cls, spec: JobSpec, rank: int) -> Workload:
        device = pick_device(spec)
        model = seeded_model(spec.seed, spec.model.name, spec.model.factory, spec.model.args).to(device)
        train, val = build_datasets(spec.dataset.name, spec.dataset.factory, spec.dataset.args, spec.val_fraction)
        loss_fn = build_loss(spec.loss.name, spec.loss.factory, spec.loss.args)
        metrics = None if spec.metrics is None else build_metrics(spec.metrics.factory, spec.metrics.args)
        return cls(spec, rank, device, model, train, val, loss_fn, spec.total_steps(len(train)),  # type: ignore[arg-type]
                   Precision(spec.precision, device), metrics)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The job's optimizer over this model's trainable parameters, grouped as the spec says
        (the server builds the same one in the ps modes)."""
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not trainable:
            raise SpecError("model", "has no trainable parameters (all have requires_grad=False)")
        o = self.spec.optimizer
        return build_optimizer(parameter_groups(trainable, o.param_groups), o.name, o.lr, o.hyper)

    @property
    def train_size(self) -> int:
        return len(self.train)  # type: ignore[arg-type]

    def batch(self, step: int) -> tuple[Any, Any]:
        """This worker's slice of step ``step``'s global batch, on its device."""
        spec = self.spec
        idx = worker_batch_indices(self.train_size, spec.batch_size, spec.workers, self.rank, spec.seed, step,
                                   self.share)
        x, y = get_batch(self.train, idx)
        return to_device(x, self.device), to_device(y, self.device)

    def gradient(self, step: int, module: Callable[..., Any], zero: Callable[[], None],
                 grads: Callable[[], Sequence[torch.Tensor]],
                 no_sync: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None,
                 ) -> tuple[torch.Tensor, int]:
        """Compute step ``step``'s gradient into the parameters' ``.grad``, as plain PyTorch
        would: ``torch.manual_seed(step_seed(seed, rank, step))``, then for each of the
        ``accumulate`` equal micro-batches ``(loss_fn(model(x_i), y_i) / accumulate).backward()``
        under the job's autocast. Returns the step's loss (the batch mean) and batch size.

        ``zero()`` clears the gradients, ``grads()`` lists them (fp16 loss scaling checks and
        unscales them), ``no_sync(i)`` is DDP's context for micro-batch ``i``."""
        x, y = self.batch(step)
        k = self.spec.accumulate
        weight = 1.0 if self.share is None else share_weight(self.spec.workers * self.spec.batch_size, *self.share)
        xs, ys = split_batch(x, k), split_batch(y, k)
        saved = ({n: b.detach().clone() for n, b in self.model.named_buffers()}
                 if self.precision.scaled else None)

        def compute(scale: float) -> torch.Tensor:
            seed_rng(step_seed(self.spec.seed, self.rank, step), self.device)
            total = torch.zeros((), device=self.device)
            for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
                with no_sync(i) if no_sync is not None else contextlib.nullcontext():
                    with self.precision.autocast():
                        loss = self.loss_fn(call_model(module, xi), yi)
                    if k > 1:
                        loss = loss / k
                    factor = (scale if self.precision.scaled else 1.0) * weight
                    (loss * factor if factor != 1.0 else loss).backward()
                total += loss.detach().float()
            return total

        def restart() -> None:
            zero()
            if saved:
                with torch.no_grad():
                    for n, b in self.model.named_buffers():
                        b.copy_(saved[n])

        zero()
        return self.precision.run(compute, grads, restart), batch_len(x) or self.spec.batch_size

    def eval_due(self, step: int) -> bool:
        """Rank 0 evaluates every ``eval_every`` steps (and at the end, which the loops do)."""
        every = self.spec.eval_every
        return self.rank == 0 and self.val is not None and bool(every) and step > 0 and step % every == 0

    def evaluate(self) -> dict[str, float]:
        assert self.val is not None
        return evaluate(self.model, self.val, self.loss_fn, self.device, metrics=self.metrics,
                        autocast=self.precision.autocast)


def seed_rng(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for the generators a worker uses (the CPU's and its own
    GPU's). ``torch.manual_seed`` itself also queues a seed for every other device with a
    formatted stack trace each time: 0.7 ms, a third of a small model's step."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device: the worker's


PHASES = {
    "build": "while building the model and data",
    "train": "at training step {step}",
    "optimizer": "in the optimizer update of step {step}",
    "eval": "in evaluation after step {step}",
    "checkpoint": "saving the checkpoint of step {step}",
}


@dataclass
class Phase:
    """Where a worker is (``PHASES``), so a failure can say where it happened."""

    name: str = "build"
    step: int = 0

    def at(self, name: str, step: int) -> None:
        self.name, self.step = name, step

    @property
    def consistent(self) -> bool:
        """Whether the model and optimizer hold the state after ``step`` whole steps (not
        half-way through an optimizer update)."""
        return self.name != "optimizer"

    def failure(self, e: BaseException) -> WorkerFailure:
        """``e`` as a WorkerFailure naming the phase and step, with the traceback."""
        where = PHASES[self.name].format(step=self.step)
        text = " ".join(f"{type(e).__name__}: {e}".split())
        return WorkerFailure(f"{where}: {text[:500]}", self.name, self.step,
                             "".join(traceback.format_exception(e)))


class Heartbeat:
    """Background heartbeats; sets ``stop_reason`` when the server says the job is over."""

    def __init__(self, client: ServerLink, interval: float) -> None:
        self.step = 0
        self.stop_reason: str | None = None
        self.regroup = False  # allreduce, an elastic job: the server asks the group to re-form
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
                reply = self._client.heartbeat(self.step)
            except Exception as e:  # noqa: BLE001 - the training loop sees real failures
                log.warning("heartbeat failed: %s", e)
                continue
            self.regroup = reply.regroup
            if reply.stop:
                self.stop_reason = reply.reason
                return


class Meter:
    """Training loss and throughput over windows of ``REPORT_EVERY_S``, and over the whole run,
    and a step's time split into computing and communicating (the window's mean per step).

    The loss stays on the device between reports: no host sync per step."""

    def __init__(self, device: torch.device) -> None:
        self._loss = torch.zeros((), device=device)
        self._samples, self._run_samples = 0, 0
        self._steps, self._comm_s = 0, 0.0
        self._start = self._run_start = time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int, comm_s: float = 0.0) -> None:
        """One step: its loss, samples, and the seconds it spent communicating."""
        self._loss += loss.detach() * samples
        self._samples += samples
        self._run_samples += samples
        self._steps += 1
        self._comm_s += comm_s

    def add_comm(self, seconds: float) -> None:
        """Communication outside a step (local-sgd's exchange at the end of a round)."""
        self._comm_s += seconds

    def due(self, last: bool) -> dict[str, float] | None:
        """The window's metrics when it is time to report (or ``last``), else None."""
        now = time.perf_counter()
        elapsed = now - self._start
        if (elapsed < REPORT_EVERY_S and not last) or not self._samples:
            return None
        comm = self._comm_s / max(self._steps, 1)
        out = {"loss": float(self._loss) / self._samples, "samples_per_s": self._samples / elapsed,
               "avg_samples_per_s": self._run_samples / (now - self._run_start),
               "comm_s": comm, "compute_s": max(elapsed / max(self._steps, 1) - comm, 0.0)}
        self._loss.zero_()
        self._samples, self._start = 0, now
        self._steps, self._comm_s = 0, 0.0
        return out
