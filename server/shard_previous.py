"""ps-sync over shards: the parameters and buffers a shard's last step started from, which a
worker that died between its pushes to two shards pulls again (a plain class the
``ParameterStore`` of each shard holds under its lock).

A worker's pushes of a step go to every shard at once; one that dies between two of them
leaves the step taken on one shard and waiting for it on another. It registers again at the
earlier step (the least of its steps on the shards), pulls that step's parameters (from here,
on a shard that took it) and pushes it again (a copy is ignored where it was taken), so the
step is the one an undisturbed run takes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradhub.proto.codec import Layout, encode
from gradhub.proto.model_state import tensors_to_proto
from gradhub.server.store_buckets import EarlyBuckets
from gradhub.server.store_config import Snapshot


class PreviousStep:
    """The parameters and buffers of the version before a shard's last step (one copy of the
    slice, its memory reused from step to step: the pull that reads it comes before the next
    step)."""

    def __init__(self) -> None:
        self._version = -1
        self._flat: torch.Tensor | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    def keep(self, version: int, flat: torch.Tensor, buffers: dict[str, torch.Tensor], early: EarlyBuckets,
             offset_of: Callable[[int], int]) -> None:
        """A step is taken from ``version``'s ``flat`` and ``buffers`` (its buckets applied
        already, ``early``, with their values from before it)."""
        if self._flat is None or self._flat.numel() != flat.numel():
            self._flat = torch.empty_like(flat)
        self._flat.copy_(flat)
        early.restore(self._flat, 0, offset_of)
        self._version, self._buffers = version, buffers

    def snapshot(self, version: int, wire_dtype: int, layout: Layout, size: int) -> Snapshot | None:
        """The parameters of ``version``, if they are the ones kept."""
        if self._flat is None or version != self._version:
            return None
        return Snapshot(version, wire_dtype, encode(self._flat, wire_dtype), layout,
                        tuple(tensors_to_proto(self._buffers)), size)
