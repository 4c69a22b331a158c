"""Gradient clipping over a sharded parameter server (``clip_grad_norm`` with ``ps_shards: K``):
in ps-sync a plain class the ``ParameterStore`` of each shard holds. (In ps-async and ps-ssp a
push is clipped by its own gradient's norm, which its worker computes and names in the push:
``clip_coefficient`` of it.)

``torch.nn.utils.clip_grad_norm_`` scales a step's gradient by ``max_norm / (norm + 1e-6)``
(at most 1), where the norm spans every parameter and so every shard. A shard that has every
worker's slice of step t holds the step (``hold``) and answers each worker's push with its
slice's sum of squares (``part``). Each worker adds the K sums in shard order and sends the
total with its pull of step t + 1; the first total to reach a shard lets it scale its slice and
take the step (``release``). Every worker adds the same numbers in the same order, so every
shard gets the same total; a worker that asks again (a retry, or one that registered again)
gets the same sum and its total is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradhub.proto.contract.errors import ProtocolError
from gradhub.proto.shards import sum_of_squares

KEPT_PARTS = 4  # the sums of the last steps, for a worker that asks again after the step was taken


@dataclass
class HeldStep:
    """A step whose gradient (the workers' mean over this shard's slice) waits for the norm."""

    step: int
    grad: torch.Tensor
    unused: frozenset[int]  # parameters (model indexes) that got no gradient: not in the norm
    part: tuple[int, int]


class ShardClip:
    """The step a shard holds for the norm, and the sums of squares it told the workers."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm
        self.held: HeldStep | None = None
        self._parts: dict[int, float] = {}

    def hold(self, held: HeldStep, views: Sequence[torch.Tensor]) -> None:
        """Hold ``held``; ``views``: its gradient's tensors (pieces of this slice), those that
        got no gradient left out. Their sum of squares, in float64, is the shard's part."""
        self.held = held
        self._parts[held.step] = sum_of_squares(views)
        for old in sorted(self._parts)[:-KEPT_PARTS]:
            del self._parts[old]

    def part(self, step: int) -> float | None:
        """This shard's sum of squares for ``step``; None while not every worker's slice is in."""
        return self._parts.get(step)

    def release(self, step: int, total_sq: float) -> HeldStep | None:
        """The held step, its gradient scaled as ``clip_grad_norm_`` scales it by the norm
        ``sqrt(total_sq)``, when ``step`` is the one held; None for a step taken already. A
        total that cannot be the sum over the shards is a ProtocolError."""
        held = self.held
        if held is None or held.step != step:
            if step in self._parts:
                return None  # taken: another worker's total came first
            raise ProtocolError(f"clip_total_sq: step {step} is not held on this shard (not every worker's "
                                "gradient of it is in)")
        own = self._parts[step]
        if not math.isfinite(total_sq) or total_sq < own * (1 - 1e-9):
            raise ProtocolError(f"clip_total_sq: {total_sq!r} is not a sum over the shards that includes this "
                                f"shard's {own!r}")
        held.grad.mul_(clip_coefficient(self.max_norm, total_sq))
        self.held = None
        return held


def clip_coefficient(max_norm: float, total_sq: float) -> torch.Tensor:
    """What ``clip_grad_norm_(max_norm)`` multiplies a gradient by whose norm is
    ``sqrt(total_sq)``: a float32 norm, the coefficient clamped to 1."""
    norm = torch.tensor(math.sqrt(total_sq), dtype=torch.float32)
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)
