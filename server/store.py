"""The parameter store: one job's parameters, optimizer state and update rule (no gRPC in here).

Parameters live in one flat float32 tensor; the optimizer (torch.optim) sees views
of it, so an update is a plain ``optimizer.step()`` (what a store holds of the model, and how
it is installed and stepped: ``gradhub.server.store_params``). The mode decides when an
update happens and when a pull may proceed:

- ``ps-sync`` (BSP): step t is applied once every worker pushed its step-t
  gradient; gradients are averaged in rank order, so results are deterministic.
  A worker pulling for step t waits until version t.
- ``ps-async``: each gradient is applied on arrival; staleness (version at apply
  minus the version the gradient was computed on) is recorded per worker.
- ``ps-ssp``: applied on arrival, but a worker about to compute step t waits
  until every live worker has pushed at least t - s steps.

Each push is identified by (rank, step): a step below the worker's clock is a
duplicate (a retry) and is ignored, so every step is applied exactly once.

Besides the flat parameters the store keeps the rest of the model's state (see
``gradhub.proto.model_state``): frozen parameters (never updated), buffers (rank 0's after
each step by default, or the workers' average) and tied keys, so checkpoints hold the
model's complete ``state_dict``. A parameter that no worker's gradient reached in a step is
not updated by it (its ``grad`` is None, as in torch.optim).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from gradhub.proto.codec import encode
from gradhub.proto.contract.errors import ProtocolError, StateError
from gradhub.proto.model_state import tensors_to_proto
from gradhub.proto.shards import sum_of_squares
from gradhub.server.shard_clip import HeldStep, ShardClip, clip_coefficient
from gradhub.server.shard_previous import PreviousStep
from gradhub.server.store_buckets import ArrivedBuckets, Assemblies, EarlyBuckets
from gradhub.server.store_config import CheckpointState, Snapshot, StoreConfig
from gradhub.server.store_params import StoreParams
from gradhub.server.workers import WorkerState

__all__ = ["CheckpointState", "ParameterStore", "Snapshot", "StoreConfig", "WorkerState"]


@dataclass(frozen=True)
class _Push:
    """One worker's contribution to a step."""

    grad: torch.Tensor
    buffers: dict[str, torch.Tensor] | None
    unused: frozenset[int]  # indexes into the model's parameters
    bucketed: bool = False  # assembled from buckets (not one whole push)
    norm_sq: float | None = None  # async over shards: the whole gradient's sum of squares (clipping)


class ParameterStore(StoreParams):
    """Owns one job's parameters and optimizer (``StoreParams``) and applies its workers' pushes
    as its mode says; every mutation happens under ``_cond``."""

    def __init__(
        self,
        config: StoreConfig,
        on_checkpoint: Callable[[CheckpointState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config, clock)
        self._on_checkpoint = on_checkpoint
        self._grad: torch.Tensor | None = None  # where ps-sync averages its workers' gradients
        self._pending: dict[int, _Push] = {}
        self._snapshots: dict[tuple[int, int, int], Snapshot] = {}  # (wire dtype, first, count) -> its data
        self._assemblies = Assemblies()  # by rank: the buckets of its step received so far
        # async modes: how many pushes were applied at each staleness (read for /metrics)
        self.staleness_counts: dict[int, int] = {}
        self._joining: set[int] = set()  # async modes: ranks that became members and have not registered since
        self._dropped: set[int] = set()  # ps-sync: ranks whose push of the step in flight was dropped (a shrink)
        # ps-sync, a shard of an elastic job: the version whose step the control store shrank at
        # once (its size is fixed: a push computed for another size is dropped, not followed)
        self._fixed_at: int | None = None
        self._early = EarlyBuckets()  # ps-sync, apply_buckets: buckets applied before their step is whole
        self._arrived = ArrivedBuckets()  # ps-async, ps-ssp, apply_buckets: buckets applied on arrival
        self._previous = PreviousStep() if config.shards > 1 and config.mode == "ps-sync" else None
        # ps-sync clipping over shards: a step waits here for the norm over every shard
        self._clip = ShardClip(config.clip_grad_norm) if config.clip_grad_norm and config.clips_across_shards \
            else None

    # --------------------------------------------------------------- workers
    def register(self, rank: int, host: str = "", pid: int = 0, credential: str | None = None,
                 at_least: int | None = None) -> tuple[int, int, bool]:
        """A worker (re)joins: returns (version, next step, whether it must send the parameters).
        ``credential``: a shard's, the one the job's control plane issued at this registration;
        ``at_least``: a shard of an elastic async job, the worker's step on the control store
        (a worker joining there starts at the others' step, and on every shard at the same).

        A rank above an elastic job's size joins it at the next change of size (its first
        pull waits until then); one above the size it was scaled to is told to leave."""
        with self._cond:
            self._worker(rank)
            if self.config.follows_control and rank >= self._target:
                self._target = rank + 1  # the control store registers the workers it wants
            self._check_member(rank)
            w = self._joined(rank, host, pid, credential)
            self._assemblies.forget(rank)  # a new registration pushes its step afresh
            self._early.forget(rank)
            if self.config.mode != "ps-sync" and rank in self._joining:
                # an async member that joined while the others trained starts where they are
                w.clock = max(w.clock, self._job_step(exclude=rank))
                self._joining.discard(rank)
            if at_least is not None:
                w.clock = max(w.clock, at_least)
            return self._version, w.clock, (self._flat is None and rank == 0)

    def _check_member(self, rank: int) -> bool:
        """``WorkerTable._check_member``; on a shard of an elastic ps-async or ps-ssp job every
        registered worker may push and pull: the control store decides who is in (a push
        reaches the shards after it took it). (A ps-sync shard's size and target follow the
        control store's: ``_follow_push``, ``follow``, ``register``.)"""
        if self.config.follows_control and self.config.mode != "ps-sync":
            self._worker(rank)  # NotFoundError outside the job
            return True
        return super()._check_member(rank)

    def follow(self, size: int, clocks: Sequence[int] = (), at_once: bool = False) -> int:
        """A shard of an elastic job: the control store's size changed to ``size``; returns this
        shard's version then. In ps-async and ps-ssp the size applies at once, each worker
        that joins at its step on the control store (``clocks``, by rank) or later. In ps-sync a
        change at a step boundary comes with the first push of the step (its ``world_size``),
        and only a shrink ``at_once`` (a worker's node died) comes here: the step in flight is
        dropped, to be done again at the new size, as on the control store. A shard that took
        that step already answers a version past the control store's: the job goes back to
        its latest checkpoint (``PSRuntime.resize``)."""
        with self._cond:
            self._check_open()
            self._check_size(size)
            if not self.config.follows_control:
                raise StateError(f"ps_shards: store {self.config.shard} of job {self.config.job_id!r} is not a "
                                 "shard of an elastic job")
            if self.config.mode == "ps-sync":
                if at_once and size < self._size:
                    self._target, self._fixed_at = size, self._version
                    self._resized(at_once=True)
            else:
                old = self._size
                self._target = size
                self._set_size(size, self._job_step())
                for w in self._workers[old:size]:
                    w.clock = max(w.clock, clocks[w.rank] if w.rank < len(clocks) else 0)
                self._snapshots.clear()
                self._checkpoint_if_due()
            self._changed()
            return self._version

    def _follow_push(self, step: int, size: int) -> None:
        """ps-sync, a shard of an elastic job: the first push of a step says the size the
        control store runs that step at (it changes sizes at step boundaries only, and a worker
        pulls a step's parameters from it before it pushes): the shard takes it. A push for
        another size while a step is in flight, or after a shrink at once, is dropped (``push``)."""
        if (self.config.mode != "ps-sync" or size == self._size or step != self._version
                or self._fixed_at == self._version or not 1 <= size <= len(self._workers)
                or self._pending or self._assemblies or self._early or self._holding):
            return
        self._target = size
        self._grow_or_shrink(self._version)

    def _resized(self, at_once: bool) -> None:
        """ps-async, ps-ssp: a new size applies at once (a joining worker starts at the job's
        step when it registers); ps-sync applies it at the next step boundary (``_take``), or
        ``at_once`` (a worker is gone for good): the step in flight is done again at the new
        size (its pushes so far are dropped; each worker's next pull says so)."""
        if self.config.mode == "ps-sync":
            if at_once and self._flat is not None:
                self._pending.clear()
                self._assemblies.clear()
                for w in self._members():
                    if w.clock > self._version:
                        self._dropped.add(w.rank)
                    w.clock = self._version
            if at_once or self._flat is None:
                self._grow_or_shrink(self._version)
            return
        old = self._size
        self._set_size(self._target, self._job_step())
        for w in self._workers[old:self._size]:
            w.clock = max(w.clock, self._job_step())
            self._joining.add(w.rank)
        self._snapshots.clear()  # a pull's header says the size
        self._checkpoint_if_due()

    def _grow_or_shrink(self, step: int) -> None:
        """ps-sync, at a step boundary: shrink to the target, or grow to it once every
        joining worker has registered (nobody waits for a process that is still starting)."""
        target, old = self._target, self._size
        if target > old and not self.config.follows_control and not all(w.alive for w in self._workers[old:target]):
            return  # (a shard follows the control store, which waited for them)
        self._set_size(target, step)
        for w in self._workers[min(old, target):]:
            w.clock = step  # a new member starts at the others' step; one that left follows it
        self._snapshots.clear()

    def _job_step(self, exclude: int = -1) -> int:
        """The slowest live member's clock (the job's step when none is live)."""
        live = [w.clock for w in self._members() if w.alive and w.rank != exclude]
        return min(live) if live else min(w.clock for w in self._members())

    def heartbeat(self, rank: int, step: int | None = None) -> str | None:
        """Record that a worker is alive; returns the reason to stop, if the job is closed."""
        with self._cond:
            w = self._worker(rank)
            w.last_seen = self._now()
            if step is not None:
                w.local_step = step
            return self._closed

    # ----------------------------------------------------------------- push
    def push(self, rank: int, step: int, base_version: int, grad: torch.Tensor,
             buffers: Mapping[str, torch.Tensor] | None = None, unused: Sequence[int] = (),
             wire_bytes: int | None = None, first: int = 0, count: int = 0, world_size: int = 0,
             norm_sq: float | None = None) -> tuple[bool, int]:
        """Take worker ``rank``'s gradient for ``step``; returns (accepted, version).

        ``grad`` is the flat gradient (any float dtype; converted to float32) of the ``count``
        tensors from ``first`` on ((0, 0): the whole model). With fragments that is the step's
        fragment; otherwise a part is a bucket of the step's gradient, pushed while the worker's
        backward still runs: the step is the worker's once its buckets cover the model (a
        bucket received again is a retry and ignored). ``buffers`` are the worker's buffers
        after its forward pass (used as the job's buffer mode says; a bucketed step's come with
        its last bucket); ``unused`` the indexes (into the pushed tensors) of parameters that
        got no gradient from this worker; ``wire_bytes`` what the push took on the wire when
        ``grad`` was decoded from it; ``world_size`` the size an elastic job's worker computed
        it for (ps-sync drops a push for another size than the job's now: the worker's next
        pull brings the step's parameters again); ``norm_sq`` the sum of squares of the worker's
        whole gradient, which an async shard clips its slice by (``clips_by_push_norm``).
        """
        with self._cond:
            self._check_open()
            w = self._worker(rank)
            if self._flat is None or self._layout is None or self._model is None:
                raise StateError("parameters: the job has no parameters yet; pull first")
            if world_size and self.config.follows_control:
                self._follow_push(step, world_size)
            if not self._check_member(rank):
                raise StateError(f"rank: worker {rank} joins the job at its next change of size; pull first")
            part = self._part_of(step, first, count)
            layout = self._layout.part(*part)
            if grad.numel() != layout.numel:
                raise ProtocolError(f"byte count: {grad.numel()} values, expected {layout.numel}")
            if step < w.clock:
                return False, self._version  # a retry of a step already taken
            if world_size and self.config.mode == "ps-sync" and world_size != self._size:
                self._dropped.add(rank)  # computed for the size before a shrink: the step is done again
                return False, self._version
            if step > w.clock:
                raise StateError(
                    f"step: worker {rank} pushed step {step} but its next step is {w.clock}"
                )
            if self._total_steps is not None and step >= self._total_steps:
                raise StateError(f"step: {step} is past the job's last step {self._total_steps - 1}")
            if base_version > self._version:
                raise ProtocolError(
                    f"base_version: {base_version} is ahead of the server's version {self._version}"
                )
            n = len(layout.names)
            bad = [i for i in unused if not 0 <= i < n]
            if bad:
                raise ProtocolError(f"unused: index {bad[0]} is outside the "
                                    f"{'model' if part[1] == 0 else 'part'}'s {n} parameters")
            bucket = part[1] and len(self._parts) <= 1
            assembly = self._assemblies.get(rank) if bucket else None
            if assembly is not None and assembly.step == step and assembly.holds(part):
                return False, self._version  # a retry of a bucket already taken
            if buffers:
                self._model.check_buffers(buffers, "buffers")
            w.bytes_in += grad.numel() * grad.element_size() if wire_bytes is None else wire_bytes
            grad = grad.to(torch.float32)  # before the check: a float64 value may overflow to inf
            self._check_finite(grad, layout)
            self._check_buffer_values(buffers)
            # the model's parameters this push does not update: its unused ones (a fragment: the others too)
            unused = [part[0] + i for i in unused]
            if bucket:
                if assembly is None or assembly.step != step:
                    assembly = self._assemblies.start(rank, step, self._layout)
                whole = assembly.add(part, self._layout.offset(part[0]), grad, unused, buffers)
                if self._applies_buckets():
                    self._bucket_in(rank, part, unused)
                elif self._applies_on_arrival():
                    self._bucket_now(w, step, base_version, part, unused)
                if not whole:
                    w.last_seen = self._now()
                    return True, self._version  # more buckets of this step to come
                self._assemblies.forget(rank)
                grad, unused, buffers, part = assembly.grad, sorted(assembly.unused), assembly.buffers, (0, 0)
            elif part[1]:
                unused += [i for i in range(len(self._layout.names)) if not part[0] <= i < part[0] + n]
            elif self._early:
                raise ProtocolError(f"first_tensor: worker {rank} pushed its whole gradient of step {step}, the "
                                    "others theirs in buckets; every worker of a job pushes the same buckets")
            if not buffers and self.config.buffers == "average" and self._model.buffers and \
                    self.config.mode == "ps-sync":
                raise ProtocolError(f"buffers: worker {rank} sent none; the job averages every worker's buffers")
            if self.config.clips_by_push_norm:
                norm_sq = self._check_push_norm(grad, norm_sq)
            self._take(w, base_version, _Push(grad, dict(buffers) if buffers else None, frozenset(unused), bool(bucket),
                                              norm_sq), part)
            return True, self._version

    def _take(self, w: WorkerState, base_version: int, push: _Push, part: tuple[int, int]) -> None:
        """Worker ``w``'s whole push of its next step (or fragment), as its mode applies it."""
        w.clock += 1
        w.last_seen = self._now()
        self._dropped.discard(w.rank)
        if self.config.mode == "ps-sync":
            self._pending[w.rank] = push
            if len(self._pending) == self._size:
                pending, self._pending = self._pending, {}
                self._keep_previous()
                self._take_buffers(pending)
                for other in self._workers[self._size:]:
                    other.clock = self._version + 1  # not members: they follow the job's step (a checkpoint too)
                if self._early.old:  # every bucket is applied already: the step is done
                    self._early.clear()
                    self._advance()
                elif self._clip is not None:  # the step waits for its norm over every shard
                    self._hold(self._average(pending), frozenset.intersection(*(p.unused for p in pending.values())),
                               part)
                else:
                    self._apply(self._average(pending),
                                frozenset.intersection(*(p.unused for p in pending.values())), part)
                if self._target != self._size and not self.config.follows_control:
                    self._grow_or_shrink(self._version)  # (a shard follows the next step's pushes)
        else:
            w.staleness = self._version - base_version
            w.max_staleness = max(w.max_staleness, w.staleness)
            self.staleness_counts[w.staleness] = self.staleness_counts.get(w.staleness, 0) + 1
            self._take_buffers({w.rank: push})
            if push.bucketed and self._arrived.done(w.rank):
                self._advance()  # its buckets are applied: the step makes a version
            else:
                grad = push.grad / (1 + w.staleness) if self.config.staleness_scaling and w.staleness else push.grad
                if push.norm_sq is not None:  # clipped by the norm of the worker's whole gradient
                    grad = grad * clip_coefficient(self.config.clip_grad_norm or 0.0, push.norm_sq)
                self._apply(grad, push.unused, part)
        self._changed()

    def _check_push_norm(self, grad: torch.Tensor, norm_sq: float | None) -> float:
        """An async push of a job that clips over shards names its whole gradient's sum of
        squares, which cannot be less than this shard's slice's."""
        if norm_sq is None:
            raise ProtocolError("clip_norm_sq: a push of a job that clips its gradient over shards names the sum "
                                "of squares of the whole gradient")
        own = sum_of_squares([grad])
        if not math.isfinite(norm_sq) or norm_sq < own * (1 - 1e-6) - 1e-30:
            raise ProtocolError(f"clip_norm_sq: {norm_sq!r} is less than this shard's slice alone ({own!r})")
        return norm_sq

    def _take_buffers(self, pushes: Mapping[int, _Push]) -> None:
        """The job's buffers after a step: rank 0's ("broadcast", "local"), or the mean of the
        workers' floating buffers in rank order ("average"; others from rank 0)."""
        first = pushes.get(0)
        if first is None or first.buffers is None:
            return
        if self.config.buffers != "average" or len(pushes) == 1:
            self._buffers = first.buffers
            return
        out = {}
        for name, t in first.buffers.items():
            if t.dtype.is_floating_point:
                total = t.to(torch.float64).clone()
                for r in range(1, len(pushes)):
                    other = pushes[r].buffers
                    assert other is not None  # push() refuses a push without them
                    total += other[name]
                t = (total / len(pushes)).to(t.dtype)
            out[name] = t
        self._buffers = out

    def _average(self, pending: dict[int, _Push]) -> torch.Tensor:
        """The mean of the workers' gradients, summed in rank order (deterministic)."""
        return self._mean([pending[r].grad for r in range(len(pending))])

    def _mean(self, grads: list[torch.Tensor], start: int = 0) -> torch.Tensor:
        """The mean of ``grads`` (by rank), summed in rank order into the store's buffer from
        element ``start`` on (the model's, a fragment's or a bucket's values)."""
        if len(grads) == 1:
            return grads[0]
        if self._grad is None:
            assert self._layout is not None
            self._grad = torch.empty(self._layout.numel, dtype=torch.float32)
        out = self._grad[start:start + grads[0].numel()]
        total = torch.add(grads[0], grads[1], out=out)  # one pass fewer than copy + add
        for g in grads[2:]:
            total += g
        total /= len(grads)
        return total

    def _part_of(self, step: int, first: int, count: int) -> tuple[int, int]:
        """The tensors (first, count) a push covers: with fragments, step s's fragment (a push
        that names another is refused); otherwise the whole model or a bucket of it."""
        assert self._layout is not None
        if len(self._parts) <= 1:
            self._layout.part(first, count)  # a run of the model's tensors, or a ProtocolError
            return (0, 0) if count in (0, len(self._layout.names)) and not first else (first, count)
        part = self._parts[step % len(self._parts)]
        if (first, count) != part:
            pushed = "the whole model" if count == 0 else f"tensors {first} to {first + count - 1}"
            raise ProtocolError(f"first_tensor: {pushed}, but step {step} syncs fragment {step % len(self._parts)} "
                                f"(tensors {part[0]} to {part[0] + part[1] - 1})")
        return part

    def _applies_buckets(self) -> bool:
        c = self.config
        return c.apply_buckets and c.mode == "ps-sync" and len(self._parts) <= 1 and self._target == self._size

    def _applies_on_arrival(self) -> bool:
        c = self.config
        return c.apply_buckets and c.mode != "ps-sync" and len(self._parts) <= 1

    def _bucket_now(self, w: WorkerState, step: int, base_version: int, part: tuple[int, int],
                    unused: Sequence[int]) -> None:
        """ps-async, ps-ssp: worker ``w``'s bucket ``part`` of ``step`` is applied as it arrives
        (scaled for its staleness when the job says so); the worker's last bucket makes the
        version (``_take``). A bucket applied already is not applied again."""
        if not self._arrived.first_time(w.rank, step, part):
            return
        assert self._layout is not None
        start, n = self._layout.offset(part[0]), self._layout.part(*part).numel
        grad = self._assemblies.grad(w.rank)[start:start + n]
        staleness = self._version - base_version
        if self.config.staleness_scaling and staleness:
            grad = grad / (1 + staleness)
        self._step_params(grad, frozenset(unused), part)
        self._snapshots.clear()
        self._changed()

    def _bucket_in(self, rank: int, part: tuple[int, int], unused: Sequence[int]) -> None:
        """ps-sync: worker ``rank``'s bucket ``part`` of the step in flight is in; once every
        worker's is, the bucket is applied, before the rest of the step arrives."""
        others_whole = any(not p.bucketed for p in self._pending.values())
        skip = self._early.arrive(rank, part, unused, self._size, self._version, others_whole)
        if skip is None:
            return
        assert self._layout is not None and self._flat is not None
        start, n = self._layout.offset(part[0]), self._layout.part(*part).numel
        grad = self._mean([self._assemblies.grad(r)[start:start + n] for r in range(self._size)], start)
        self._early.applied(part, self._flat[start:start + n].clone())
        self._step_params(grad, skip, part)
        self._snapshots.clear()  # a pull of the step in flight's version gets the old values of this bucket
        self._changed()  # its pulls ahead may go

    def _keep_previous(self) -> None:
        """ps-sync over shards, as a step is taken: keep the parameters and buffers it starts
        from (``PreviousStep``)."""
        if self._previous is not None and self._flat is not None and self._layout is not None:
            self._previous.keep(self._version, self._flat, self._buffers, self._early, self._layout.offset)

    def _previous_snapshot(self, step: int, wire_dtype: int, part: tuple[int, int]) -> Snapshot | None:
        """The parameters of ``step`` when this shard took it already (or holds it for its
        norm): a worker that starts again at a step another shard still waits for."""
        if self._previous is None or part != (0, 0) or not (step < self._version or self._holding):
            return None
        assert self._layout is not None
        return self._previous.snapshot(step, wire_dtype, self._layout, self._size)

    def _hold(self, grad: torch.Tensor, unused: frozenset[int], part: tuple[int, int]) -> None:
        """ps-sync clipping over shards: hold the step until a worker brings the norm."""
        assert self._clip is not None and self._layout is not None
        views = [v for i, v in enumerate(self._layout.part(*part).split(grad).values()) if i + part[0] not in unused]
        self._clip.hold(HeldStep(self._version, grad, unused, part), views)

    def pushed(self, rank: int, step: int) -> bool:
        """Whether worker ``rank``'s whole gradient of ``step`` is in (every bucket of it)."""
        with self._cond:
            return self._worker(rank).clock > step

    def clip_part(self, step: int) -> float | None:
        """This shard's sum of squares of step ``step``'s mean gradient (the reply to a push of
        a job that clips over shards); None until every worker's gradient of it is in."""
        with self._cond:
            if self._clip is None:
                raise ProtocolError(f"clip_part: job {self.config.job_id!r} does not clip its gradient over shards")
            return self._clip.part(step)

    @property
    def _holding(self) -> bool:
        """A step waits for its norm over every shard (``ShardClip``)."""
        return self._clip is not None and self._clip.held is not None

    def clip_held(self) -> int | None:
        """The step held for its norm over every shard, if any."""
        with self._cond:
            return None if self._clip is None or self._clip.held is None else self._clip.held.step

    def clip_total(self, step: int, total_sq: float) -> None:
        """The sum of every shard's part for ``step``, from a worker: the step is taken (once)."""
        with self._cond:
            if self._clip is None:
                raise ProtocolError(f"clip_total_sq: job {self.config.job_id!r} does not clip its gradient over shards")
            held = self._clip.release(step, total_sq)
            if held is not None:
                self._apply(held.grad, held.unused, held.part)
                self._changed()

    def _apply(self, grad: torch.Tensor, unused: frozenset[int] = frozenset(), part: tuple[int, int] = (0, 0)) -> None:
        """One optimizer step with ``grad`` (flat float32, over the tensors ``part``), and the
        version that makes."""
        self._step_params(grad, unused, part)
        self._advance()

    def _advance(self) -> None:
        """The step is applied: the schedule's step, a new version (and maybe a checkpoint)."""
        if self._scheduler is not None:
            self._scheduler.step()
        self._version += 1
        self._snapshots.clear()
        self._keep_version()
        self._maybe_checkpoint()

    # ----------------------------------------------------------------- pull
    def pull(self, rank: int, step: int, wire_dtype: int, timeout: float | None, first: int = 0,
             count: int = 0) -> Snapshot:
        """Parameters for worker ``rank``'s ``step``, after waiting as the mode requires: of the
        whole model, or of the ``count`` tensors from ``first`` on (a fragment).

        ``step`` at or past the last step waits for the end of training (the final
        parameters). Raises TimeoutError when ``timeout`` passes first.
        """
        deadline = None if timeout is None else self._now() + timeout
        with self._cond:
            while (snapshot := self._try_pull(rank, step, wire_dtype, first, count)) is None:
                remaining = None if deadline is None else deadline - self._now()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(self._waiting_for(step))
                self._cond.wait(remaining)
            return snapshot

    def try_pull(self, rank: int, step: int, wire_dtype: int, first: int = 0, count: int = 0,
                 ahead: bool = False) -> Snapshot | None:
        """``pull`` without waiting: the parameters for ``step``, or None while the mode says
        wait (the caller waits for a listener's call, see ``add_listener``). ``ahead``: a
        bucket's parameters for the next step may come as soon as that bucket is applied
        (ps-sync, ``apply_buckets``), before the rest of the step; they carry no buffers."""
        with self._cond:
            return self._try_pull(rank, step, wire_dtype, first, count, ahead)

    def _ahead(self, rank: int, wire_dtype: int, part: tuple[int, int]) -> Snapshot:
        """Bucket ``part``'s new values, applied before the rest of its step."""
        assert self._flat is not None and self._layout is not None
        layout = self._layout.part(*part)
        start = self._layout.offset(part[0])
        data = encode(self._flat[start:start + layout.numel], wire_dtype).clone()
        self._workers[rank].bytes_out += data.numel() * data.element_size()
        return Snapshot(self._version + 1, wire_dtype, data, layout, (), self._size)

    def _try_pull(self, rank: int, step: int, wire_dtype: int, first: int, count: int,
                  ahead: bool = False) -> Snapshot | None:
        self._worker(rank)
        self._check_open()
        if not self._check_member(rank):
            return None  # it joins at the next change of size
        if self._layout is not None:
            self._layout.part(first, count)  # a part of the model, or a ProtocolError
        if ahead and step == self._version + 1 and (first, count) in self._early.old:
            return self._ahead(rank, wire_dtype, (first, count))
        snapshot = self._previous_snapshot(step, wire_dtype, (first, count))
        if snapshot is None and self._flat is not None and self._may_pull(rank, step):
            snapshot = self._snapshot(wire_dtype, first, count)
        if snapshot is not None:
            self._workers[rank].bytes_out += snapshot.data.numel() * snapshot.data.element_size()
            return snapshot
        return None

    def waiting_for(self, step: int) -> str:
        """What a pull for ``step`` waits for, in words (the message of its timeout)."""
        with self._cond:
            return self._waiting_for(step)

    def _may_pull(self, rank: int, step: int) -> bool:
        if rank in self._dropped and self._workers[rank].clock < step:
            return True  # its push was dropped (the job shrank mid-step): it does that step again
        total = self._total_steps
        if total is not None and step >= total:  # the final parameters: after the last step (and its norm)
            return not self._holding and all(w.clock >= total for w in self._members())
        if self.config.mode == "ps-sync":
            return self._version >= step
        if self._fence_ahead(step) is not None:
            return False
        if self.config.mode == "ps-ssp":
            live = [w.clock for w in self._members() if w.alive] or [step]
            return min(live) >= step - self.config.staleness
        return True

    def _fence_ahead(self, step: int) -> int | None:
        """``fences_checkpoints``: the checkpoint step a pull of ``step`` still waits for (every
        worker's clock there), None when it waits for none. Each shard takes that checkpoint when
        the last worker's push before it arrives (``_maybe_checkpoint``), and no worker can have
        pushed past it, since its pull waited: so every shard's checkpoint holds the same pushes,
        all workers at that step."""
        if not self.config.fences_checkpoints:
            return None
        fence = step // self.config.checkpoint_every * self.config.checkpoint_every
        return fence if min(w.clock for w in self._members()) < fence else None

    def _waiting_for(self, step: int) -> str:
        if self._flat is None:
            return "waiting for the initial parameters from worker 0"
        # the clock each worker must reach for _may_pull(step) (ps-ssp waits for live ones only)
        total, pool, need, why = self._total_steps, self._members(), step, ""
        if total is not None and step >= total:
            need = total
        elif (fence := self._fence_ahead(step)) is not None:
            need = fence
            why = f" to reach the checkpoint at step {need}, which every shard takes at once"
        elif self.config.mode == "ps-ssp":
            pool = [w for w in self._members() if w.alive]
            need = step - self.config.staleness
        behind = [w.rank for w in pool if w.clock < need]
        return f"waiting at step {step} for workers {behind}{why} (version {self._version})"

    def _snapshot(self, wire_dtype: int, first: int = 0, count: int = 0) -> Snapshot:
        key = (wire_dtype, first, count)
        snap = self._snapshots.get(key)
        if snap is None:
            assert self._flat is not None and self._layout is not None
            layout = self._layout.part(first, count)
            start = self._layout.offset(first)
            values = self._flat[start:start + layout.numel]
            if self._early.old:  # buckets of the step in flight are applied: this version holds their old values
                values = values.clone()
                self._early.restore(values, start, self._layout.offset)
            data = encode(values, wire_dtype)
            if data.data_ptr() == values.data_ptr() and self.config.mode != "ps-sync":
                data = data.clone()  # updates may happen while a pull still sends this version
            snap = Snapshot(self._version, wire_dtype, data, layout, tuple(tensors_to_proto(self._buffers)),
                            self._size)
            self._snapshots[key] = snap
        return snap

    # ------------------------------------------------------- state and life
    def finished(self) -> bool:
        with self._cond:
            t = self._total_steps
            # (clipping over shards: the last step may still wait for its norm)
            return t is not None and not self._holding and all(w.clock >= t for w in self._members())

    def checkpoint_state(self) -> CheckpointState:
        with self._cond:
            return self._capture()

    def _capture(self) -> CheckpointState:
        if self._stepper is None:
            raise StateError("parameters: the job has no parameters yet")
        if self._early.old:
            raise StateError(f"parameters: step {self._version} is applied in part (the buckets in so far); the "
                             "job's state is whole again at the end of the step")
        return CheckpointState(
            step=min(w.clock for w in self._members()),
            version=self._version,
            params=self._state_dict(),
            optimizer_state=self._stepper.state_dict(),
            scheduler_state=self._scheduler.state_dict() if self._scheduler is not None else None,
            clocks=tuple(w.clock for w in self._workers),
        )

    def _checkpoint_if_due(self) -> None:
        """Async modes, the members changed: their slowest may be at a checkpoint's step now,
        with no push to take it there (over shards every store takes it: the server merges
        their parts and waits for every one)."""
        if self._flat is not None:
            self._maybe_checkpoint()

    def _maybe_checkpoint(self) -> None:
        every = self.config.checkpoint_every
        if self._on_checkpoint is None or every <= 0 or self._arrived:
            return  # (async: not while a worker's step is applied in part; a later update takes it)
        # ps-sync: exactly at step boundaries; other modes: when the slowest worker crosses one.
        step = min(w.clock for w in self._members())
        if self.config.mode == "ps-sync":
            due = self._version % every == 0
        else:
            due = step % every == 0 and step > 0 and step != self._last_ckpt_step
        if due and (self._total_steps is None or step < self._total_steps):
            self._last_ckpt_step = step
            self._on_checkpoint(self._capture())
