"""A store's optimizer stepped over its one flat parameter vector while every step updates every
tensor, and over the tensors (views of that vector) otherwise; its state is always read and loaded
tensor by tensor, as a single-process script's ``optimizer.state_dict()`` holds it.

Every optimizer gradhub supports is elementwise, so one step over the flat vector is the same
arithmetic as one over each tensor (tests/unit/test_flat_optimizer.py checks it bit for bit for
every optimizer and option): what changes is the cost. A torch optimizer's step on the CPU is a
loop over its tensors, in Python for the parts that prepare the call and in C++ for each operation;
over one tensor that loop runs once (README, Performance (c)). A step that leaves a tensor out (an
unused parameter, a bucket or fragment of the model) cannot be taken over the flat vector: torch
leaves such a tensor's state alone, its step count included. From that step on the optimizer
steps the tensors, and its state is theirs (views of the flat state: nothing is copied).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gradhub.proto.contract.optim import optimizer_state_copy

# The state each optimizer keeps per element (split into the tensors' views, or joined into
# the flat vector's); every other key is per tensor, and listed here too: a key that is in
# neither (a torch version that adds one) keeps the optimizer on the tensors.
ELEMENTWISE_STATE: dict[type[torch.optim.Optimizer], frozenset[str]] = {
    torch.optim.SGD: frozenset({"momentum_buffer"}),
    torch.optim.Adam: frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    torch.optim.AdamW: frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    torch.optim.Adagrad: frozenset({"sum"}),
    torch.optim.RMSprop: frozenset({"square_avg", "momentum_buffer", "grad_avg"}),
    torch.optim.Adadelta: frozenset({"square_avg", "acc_delta"}),
}
PER_TENSOR_STATE = frozenset({"step"})


def load_optimizer_machinery() -> None:
    """Build and drop a first ``torch.optim`` optimizer: that imports ``torch._dynamo`` (one to
    three seconds holding the GIL), which a process that serves a job's calls does at start,
    before it has threads of its own, rather than in the middle of its first push. Started on
    a thread beside ``ray.init``, it once crashed a starting server in CI (SIGSEGV in that
    thread): torch._dynamo is not thread-safe (pytorch/pytorch#118260)."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


class FlatOptimizer:
    """``optimizer`` (built over ``params``, the views of ``flat`` in order, in one parameter
    group) stepped over ``flat`` itself when it can be: ``flat`` tells which it does now, and
    ``why_not`` why not."""

    def __init__(self, optimizer: torch.optim.Optimizer, flat: torch.Tensor,
                 params: Sequence[torch.nn.Parameter]) -> None:
        self.optimizer = optimizer
        self._params = list(params)
        self._vector = torch.nn.Parameter(flat, requires_grad=True)  # the same memory as ``flat``
        self._bounds: list[tuple[int, int]] = []
        start = 0
        for p in self._params:
            self._bounds.append((start, p.numel()))
            start += p.numel()
        self.flat = False
        self.why_not = ""
        self.try_flat()

    # ----------------------------------------------------------------- stepping
    def step(self, grad: torch.Tensor) -> None:
        """One step with ``grad``, the whole flat gradient (``flat`` must be True)."""
        if not self.flat:
            raise RuntimeError("FlatOptimizer.step: the optimizer steps the tensors now (to_tensors was called)")
        self._vector.grad = grad
        try:
            self.optimizer.step()
        finally:
            self._vector.grad = None  # the gradient's memory goes back to whoever received it

    def to_tensors(self, why: str = "") -> None:
        """Step the tensors from now on: the flat state becomes their views."""
        if not self.flat:
            return
        group = self.optimizer.param_groups[0]
        state = self.optimizer.state.pop(self._vector, None)
        group["params"] = list(self._params)
        if state:
            for p, bounds in zip(self._params, self._bounds, strict=True):
                self.optimizer.state[p] = self._piece(state, bounds, p, copy=False)
        self.flat, self.why_not = False, why

    def try_flat(self) -> bool:
        """Step the flat vector from now on, when the optimizer and its state allow it (the
        tensors' state joined into the vector's); False, with ``why_not``, when they do not."""
        if self.flat:
            return True
        why = self._refusal()
        if why:
            self.why_not = why
            return False
        joined = self._joined([self.optimizer.state.get(p) or {} for p in self._params])
        if isinstance(joined, str):
            self.why_not = joined
            return False
        for p in self._params:
            self.optimizer.state.pop(p, None)
        self.optimizer.param_groups[0]["params"] = [self._vector]
        if joined:
            self.optimizer.state[self._vector] = joined
        self.flat, self.why_not = True, ""
        return True

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's ``state_dict`` over the tensors, copied to the host (a snapshot the
        next step does not change): the same whether it steps the flat vector or the tensors."""
        if not self.flat:
            return optimizer_state_copy(self.optimizer)
        sd = self.optimizer.state_dict()
        groups = [dict(g) for g in sd["param_groups"]]
        groups[0]["params"] = list(range(len(self._params)))
        vector_state = sd["state"].get(0)
        state = {} if not vector_state else {
            i: self._piece(vector_state, bounds, p, copy=True)
            for i, (p, bounds) in enumerate(zip(self._params, self._bounds, strict=True))}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a ``state_dict`` over the tensors (a checkpoint's), then step the flat vector if
        the state allows (every tensor at the same step count)."""
        self.to_tensors()
        self.optimizer.load_state_dict(dict(state_dict))
        for group in self.optimizer.param_groups:  # a checkpoint's groups bring their own choice
            group["foreach"] = True
        self.try_flat()

    # ----------------------------------------------------------------- helpers
    def _refusal(self) -> str:
        groups = self.optimizer.param_groups
        if len(groups) != 1:
            return f"{len(groups)} parameter groups"
        if type(self.optimizer) not in ELEMENTWISE_STATE:
            return f"{type(self.optimizer).__name__} is not known to be elementwise"
        if not self._params:
            return "no trainable parameters"
        if [id(p) for p in groups[0]["params"]] != [id(p) for p in self._params]:
            return "the optimizer's parameters are not the store's tensors"
        base = self._vector.data_ptr()
        size = self._vector.element_size()
        for p, (start, _) in zip(self._params, self._bounds, strict=True):
            if p.data_ptr() != base + start * size or not p.is_contiguous():
                return "the tensors are not views of the flat vector in order"
        if self._bounds[-1][0] + self._bounds[-1][1] != self._vector.numel():
            return "the tensors do not cover the flat vector"
        return ""

    def _joined(self, states: list[dict[str, Any]]) -> dict[str, Any] | str:
        """The tensors' states as the flat vector's, or why they cannot be."""
        if all(not s for s in states):
            return {}
        if any(not s for s in states):
            return "some tensors have optimizer state and others none"
        keys = set(states[0])
        if any(set(s) != keys for s in states):
            return "the tensors' optimizer states hold different keys"
        elementwise = ELEMENTWISE_STATE[type(self.optimizer)]
        joined: dict[str, Any] = {}
        for key in sorted(keys):
            values = [s[key] for s in states]
            if key in elementwise and all(v is None for v in values):
                joined[key] = None
            elif key in elementwise:
                if not all(torch.is_tensor(v) and v.shape == p.shape and v.dtype == self._vector.dtype
                           for v, p in zip(values, self._params, strict=True)):
                    return f"optimizer state {key!r} is not shaped as its tensors"
                joined[key] = torch.cat([v.reshape(-1) for v in values])
            elif key in PER_TENSOR_STATE:
                first = values[0]
                same = all(torch.equal(v, first) if torch.is_tensor(first) and torch.is_tensor(v) else v == first
                           for v in values)
                if not same:
                    return f"the tensors' optimizer state {key!r} differs (a step left some out)"
                joined[key] = first.clone() if torch.is_tensor(first) else first
            else:
                return f"optimizer state {key!r} is not known"
        return joined

    def _piece(self, state: Mapping[str, Any], bounds: tuple[int, int], p: torch.Tensor,
               copy: bool) -> dict[str, Any]:
        """Tensor ``p``'s share of the flat vector's ``state`` (its views, or copies on the host)."""
        start, n = bounds
        elementwise = ELEMENTWISE_STATE[type(self.optimizer)]
        out: dict[str, Any] = {}
        for key, v in state.items():
            if key in elementwise and torch.is_tensor(v):
                v = v[start:start + n].view(p.shape)
                out[key] = v.detach().to("cpu", copy=True) if copy else v
            elif torch.is_tensor(v):
                out[key] = v.detach().to("cpu", copy=True) if copy else v.clone()
            else:
                out[key] = v
        return out
