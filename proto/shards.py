"""How a job's parameters are split over parameter-server shards (``ps_shards: K``), and how the
shards' states are put back together: the one description both ends share.

A sharded job has K + 1 stores: store 0 is the server's, the job's control (it holds no
trainable value: it keeps the frozen parameters, the buffers, the schedule and the job's step,
and answers for the whole), and stores 1 to K are the shards, each its own process. The flat
vector of trainable parameters is cut into K contiguous slices of near-equal length, one per
shard (``shards_of``). A slice may cut a tensor in two: each shard holds *pieces*, one per
tensor it overlaps, named like the tensor and flat (shape ``(n,)``). The optimizers gradhub
supports are elementwise, so a shard that runs the same ``torch.optim`` optimizer over its
pieces takes exactly the whole model's step on them. A checkpoint is always the whole model's,
in the format an unsharded job writes (``merge_*``), and a job resumes from it with any K
(``split_*``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import SpecError, StateError
from gradhub.proto.contract.optim import group_names
from gradhub.proto.contract.spec import MAX_PS_SHARDS as MAX_SHARDS

_SCALAR_STATE = frozenset({"step"})  # optimizer state that is one value per tensor, not per element


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: elements ``lo`` to ``hi - 1`` of the flat trainable vector,
    as pieces of the model's tensors ``first`` to ``first + len(layout.names) - 1``."""

    index: int
    count: int
    lo: int
    hi: int
    first: int
    layout: Layout  # the pieces: the tensors' names, shapes (n,)
    starts: tuple[int, ...]  # where each piece starts in its tensor's flat values

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    def piece_index(self, tensor: int) -> int | None:
        """The piece of model tensor ``tensor`` in this shard (None: it holds none of it)."""
        i = tensor - self.first
        return i if 0 <= i < len(self.layout.names) else None

    def unused(self, unused: Iterable[int]) -> list[int]:
        """The model's tensors ``unused`` (indexes) as indexes of this shard's pieces."""
        return [i for t in unused if (i := self.piece_index(t)) is not None]

    def pieces(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This shard's pieces (copies) of the whole model's ``tensors`` by name."""
        return {name: tensors[name].detach().reshape(-1)[start:start + n].clone()
                for name, start, n in zip(self.layout.names, self.starts, self.layout.numels, strict=True)}


def stores_for(shards: int) -> int:
    """How many stores a job with ``ps_shards: shards`` has: one, or the control and the shards."""
    return 1 if shards == 1 else shards + 1


def check_count(count: int, layout: Layout) -> None:
    """``count`` stores (``stores_for``) for a model of ``layout``: 1 to 64 shards, and no more
    shards than trainable values."""
    shards = count - 1 if count > 1 else 1
    if not 1 <= shards <= min(MAX_SHARDS, layout.numel):
        raise SpecError("ps_shards", f"{shards} shards for a model of {layout.numel} trainable values "
                                     f"(1 to {min(MAX_SHARDS, layout.numel)})")


def shards_of(layout: Layout, count: int) -> tuple[Shard, ...]:
    """The slices of ``layout``'s flat vector that the ``count`` stores of a job hold: with one,
    all of it; with more, none on store 0 (the control) and ``count - 1`` contiguous slices
    whose lengths differ by at most one on the shards 1 to ``count - 1``."""
    check_count(count, layout)
    total, offsets = layout.numel, [0]
    for n in layout.numels:
        offsets.append(offsets[-1] + n)
    slices = count - 1 if count > 1 else 1
    out = [] if count == 1 else [Shard(0, count, 0, 0, 0, Layout((), ()), ())]
    for j in range(slices):
        lo, hi = total * j // slices, total * (j + 1) // slices
        names, shapes, starts, first = [], [], [], -1
        for t, name in enumerate(layout.names):
            a, b = max(lo, offsets[t]), min(hi, offsets[t + 1])
            if a < b:
                first = t if first < 0 else first
                names.append(name)
                shapes.append((b - a,))
                starts.append(a - offsets[t])
        out.append(Shard(len(out), count, lo, hi, first, Layout(tuple(names), tuple(shapes)), tuple(starts)))
    return tuple(out)


# ------------------------------------------------------------------ gradient norms (clipping)
def sum_of_squares(tensors: Iterable[torch.Tensor]) -> float:
    """The sum of the squares of every value of ``tensors``, in float64: a shard's part of a
    gradient's squared norm (ps-sync), or a worker's whole gradient's (the async modes), which
    a shard checks against its own slice's."""
    total = 0.0
    for t in tensors:
        total += float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
    return total


def total_of_parts(parts: Iterable[float]) -> float:
    """The shards' parts of a squared norm added in shard order: every worker (and the server,
    settling a step) adds the same numbers in the same order, so every shard gets the same total."""
    total = 0.0
    for part in parts:
        total += part
    return total


# ------------------------------------------------------------------ parameters
def merge_params(layout: Layout, shards: Sequence[Shard], pieces: Sequence[Mapping[str, torch.Tensor]],
                 ) -> dict[str, torch.Tensor]:
    """The model's trainable tensors by name from every shard's pieces."""
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in layout.names}
    for shard, held in zip(shards, pieces, strict=True):
        for name in shard.layout.names:
            parts[name].append(held[name].reshape(-1))
    return {name: torch.cat(parts[name]).reshape(shape) for name, shape in zip(layout.names, layout.shapes,
                                                                               strict=True)}


# ------------------------------------------------------------------ optimizer state
def _indexes(names: Sequence[str], groups: Sequence[Mapping[str, Any]], state: Mapping[str, Any],
             shard_of: Sequence[str] | None = None) -> dict[str, int]:
    """Each parameter's index in an optimizer ``state`` dict built over ``names`` and ``groups``."""
    expected = group_names(names, groups, shard_of=shard_of)
    saved = state["param_groups"]
    if len(saved) != len(expected):
        raise StateError(f"optimizer state: {len(saved)} parameter groups, the job's optimizer has {len(expected)}")
    out: dict[str, int] = {}
    for (members, _), group in zip(expected, saved, strict=True):
        if len(group["params"]) != len(members):
            raise StateError(f"optimizer state: a group of {len(group['params'])} parameters, the job's has "
                             f"{len(members)}")
        out.update(zip(members, group["params"], strict=True))
    return out


def _sliced(key: str, value: Any, shape: tuple[int, ...]) -> bool:
    return torch.is_tensor(value) and key not in _SCALAR_STATE and tuple(value.shape) == shape


def merge_optimizer_state(layout: Layout, groups: Sequence[Mapping[str, Any]], shards: Sequence[Shard],
                          states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The whole model's ``optimizer.state_dict()`` from every shard's (as an unsharded store's
    optimizer would hold it)."""
    names = list(layout.names)
    index = [_indexes(s.layout.names, groups, st, shard_of=names) for s, st in zip(shards, states, strict=True)]
    full_groups = group_names(names, groups)
    out_state: dict[int, dict[str, Any]] = {}
    out_groups: list[dict[str, Any]] = []
    next_index = 0
    for g, (members, _) in enumerate(full_groups):
        params = []
        for name in members:
            t = layout.names.index(name)
            params.append(next_index)
            held = [(s, st["state"].get(index[k][name])) for k, (s, st) in enumerate(zip(shards, states, strict=True))
                    if s.piece_index(t) is not None]
            if all(h is None for _, h in held):
                next_index += 1
                continue  # no step touched it yet
            if any(h is None for _, h in held):
                raise StateError(f"optimizer state: '{name}' has state on some shards but not on others")
            merged: dict[str, Any] = {}
            first_shard, first = held[0]
            assert first is not None
            for key, value in first.items():
                piece_shape = (first_shard.layout.numels[first_shard.piece_index(t) or 0],)
                if _sliced(key, value, piece_shape):
                    merged[key] = torch.cat([h[key].reshape(-1) for _, h in held if h is not None]).reshape(
                        layout.shapes[t])
                else:
                    merged[key] = value
            out_state[next_index] = merged
            next_index += 1
        hyper = {k: v for k, v in states[0]["param_groups"][g].items() if k != "params"}
        out_groups.append({**hyper, "params": params})
    return {"state": out_state, "param_groups": out_groups}


def split_optimizer_state(layout: Layout, groups: Sequence[Mapping[str, Any]], shard: Shard,
                          state: Mapping[str, Any]) -> dict[str, Any]:
    """Shard ``shard``'s ``optimizer.state_dict()`` from the whole model's (a checkpoint's)."""
    full = _indexes(layout.names, groups, state)
    out_state: dict[int, dict[str, Any]] = {}
    out_groups: list[dict[str, Any]] = []
    next_index = 0
    for g, (members, _) in enumerate(group_names(shard.layout.names, groups, shard_of=list(layout.names))):
        params = []
        for name in members:
            t = layout.names.index(name)
            i = shard.piece_index(t)
            assert i is not None
            params.append(next_index)
            saved = state["state"].get(full[name])
            if saved is not None:
                start, n = shard.starts[i], shard.layout.numels[i]
                out_state[next_index] = {
                    k: v.reshape(-1)[start:start + n].clone() if _sliced(k, v, layout.shapes[t])
                    else (v.clone() if torch.is_tensor(v) else v)
                    for k, v in saved.items()}
            next_index += 1
        hyper = {k: v for k, v in state["param_groups"][g].items() if k != "params"}
        out_groups.append({**hyper, "params": params})
    return {"state": out_state, "param_groups": out_groups}
