"""A step's gradient in buckets, as a parameter store keeps track of it (plain state, held and
changed under the store's lock).

A worker with ``bucket_mb`` pushes its step's gradient in buckets, runs of whole tensors,
while its backward still runs. The store gathers each worker's buckets into its whole gradient
(``Assemblies``); with ``apply_buckets`` it also applies each bucket before the rest of the
step: in ps-sync once every worker's part of it is in (``EarlyBuckets``), in ps-async and
ps-ssp as it arrives (``ArrivedBuckets``). A part is ``(first tensor, count)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import ProtocolError

Part = tuple[int, int]  # (first tensor, count); (0, 0) is the whole model


@dataclass
class Assembly:
    """The buckets of one worker's step received so far, gathered into its whole gradient."""

    step: int
    grad: torch.Tensor  # flat float32, the model's size (reused from step to step)
    covered: list[bool]  # by tensor
    unused: set[int] = field(default_factory=set)
    buffers: Mapping[str, torch.Tensor] | None = None

    def holds(self, part: Part) -> bool:
        """Whether bucket ``part`` was received (a bucket overlapping one received is refused)."""
        mine = self.covered[part[0]:part[0] + part[1]]
        if any(mine) and not all(mine):
            raise ProtocolError(f"first_tensor: tensors {part[0]} to {part[0] + part[1] - 1} overlap a bucket "
                                f"of step {self.step} already received")
        return all(mine)

    def add(self, part: Part, offset: int, grad: torch.Tensor, unused: list[int],
            buffers: Mapping[str, torch.Tensor] | None) -> bool:
        """Take a bucket; whether the step is whole now."""
        self.grad[offset:offset + grad.numel()] = grad
        self.covered[part[0]:part[0] + part[1]] = [True] * part[1]
        self.unused.update(unused)
        if buffers:
            self.buffers = buffers
        return all(self.covered)


class Assemblies:
    """Each worker's step in the buckets received so far, by rank. A worker's gradient buffer
    is kept from step to step: its step is applied before its next step's buckets come."""

    def __init__(self) -> None:
        self._by_rank: dict[int, Assembly] = {}
        self._grads: dict[int, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self._by_rank)

    def get(self, rank: int) -> Assembly | None:
        return self._by_rank.get(rank)

    def start(self, rank: int, step: int, layout: Layout) -> Assembly:
        """Worker ``rank``'s first bucket of ``step``: a new assembly in its buffer."""
        grad = self._grads.get(rank)
        if grad is None:
            grad = self._grads[rank] = torch.empty(layout.numel)
        assembly = self._by_rank[rank] = Assembly(step, grad, [False] * len(layout.names))
        return assembly

    def grad(self, rank: int) -> torch.Tensor:
        """Worker ``rank``'s gradient buffer (the buckets of its step received so far)."""
        return self._grads[rank]

    def forget(self, rank: int) -> None:
        """Worker ``rank``'s step is whole, or it registered again (it pushes its step afresh)."""
        self._by_rank.pop(rank, None)

    def clear(self) -> None:
        self._by_rank.clear()


class EarlyBuckets:
    """ps-sync with ``apply_buckets``: the buckets of the step in flight that some workers' parts
    of are in (``waiting``), the buckets applied already with the parameters' values before
    them (``old``: the values of the step in flight's version, which its pulls get), and each
    worker's unused parameters among its buckets. Every worker of a job pushes the same
    buckets."""

    def __init__(self) -> None:
        self.waiting: dict[Part, set[int]] = {}
        self.old: dict[Part, torch.Tensor] = {}
        self._unused: dict[int, set[int]] = {}

    def __bool__(self) -> bool:
        return bool(self.waiting or self.old)

    def forget(self, rank: int) -> None:
        """Worker ``rank`` registered again: it pushes its step afresh (its buckets applied
        already stay applied)."""
        for ranks in self.waiting.values():
            ranks.discard(rank)
        self._unused.pop(rank, None)

    def clear(self) -> None:
        """The step is done."""
        self.waiting.clear()
        self.old.clear()
        self._unused.clear()

    def arrive(self, rank: int, part: Part, unused: Sequence[int], size: int, step: int,
               others_whole: bool) -> frozenset[int] | None:
        """Worker ``rank``'s bucket ``part`` of ``step`` is in (``unused``: its parameters, as
        model indexes, that got no gradient). Once every one of the ``size`` workers' is, returns
        the parameters none of them used: the bucket is to be applied (``applied``). None until
        then, and for a bucket applied already. ``others_whole``: a worker pushed its whole
        gradient of the step (refused: the workers must push the same buckets)."""
        if part in self.old:
            return None  # applied already: a worker that registered again pushes its step afresh
        for other in (*self.waiting, *self.old):
            if other != part and other[0] < part[0] + part[1] and part[0] < other[0] + other[1]:
                raise ProtocolError(f"first_tensor: bucket {part} overlaps bucket {other} of another worker; every "
                                    "worker of a job pushes the same buckets")
        if others_whole:
            raise ProtocolError(f"first_tensor: worker {rank} pushed buckets of step {step}, others their "
                                "whole gradient; every worker of a job pushes the same buckets")
        ranks = self.waiting.setdefault(part, set())
        ranks.add(rank)
        self._unused.setdefault(rank, set()).update(unused)
        if len(ranks) < size:
            return None
        del self.waiting[part]
        return frozenset.intersection(*(frozenset(self._unused.get(r, ())) for r in range(size)))

    def applied(self, part: Part, before: torch.Tensor) -> None:
        """Bucket ``part`` is applied; ``before``: its parameters' values before (a copy)."""
        self.old[part] = before

    def restore(self, values: torch.Tensor, start: int, offset_of: Callable[[int], int]) -> None:
        """Write the values from before the applied buckets into ``values``, the parameters from
        element ``start`` on, so that they hold the step in flight's version."""
        end = start + values.numel()
        for (first, _), old in self.old.items():
            lo = offset_of(first)
            hi = lo + old.numel()
            if lo < end and start < hi:
                at, to = max(lo, start), min(hi, end)
                values[at - start:to - start] = old[at - lo:to - lo]


class ArrivedBuckets:
    """ps-async, ps-ssp with ``apply_buckets``: each worker's buckets of its step applied on
    arrival, kept across a new registration (the step pushed afresh applies each bucket once)."""

    def __init__(self) -> None:
        self._by_rank: dict[int, tuple[int, set[Part]]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_rank)

    def first_time(self, rank: int, step: int, part: Part) -> bool:
        """Whether worker ``rank``'s bucket ``part`` of ``step`` is to be applied (not yet)."""
        step_parts = self._by_rank.get(rank)
        if step_parts is None or step_parts[0] != step:
            step_parts = self._by_rank[rank] = (step, set())
        if part in step_parts[1]:
            return False
        step_parts[1].add(part)
        return True

    def done(self, rank: int) -> bool:
        """Worker ``rank``'s step is whole: whether its buckets were applied on arrival."""
        return self._by_rank.pop(rank, None) is not None
