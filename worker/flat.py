"""A model whose trainable parameters and gradients are views into two flat float32 buffers,
and the rest of its state (frozen parameters, buffers, tied keys) described for the wire.

Pulled parameters land in one buffer with one copy, and backward() accumulates straight
into the flat gradient (as DDP's ``gradient_as_bucket_view`` does), so a push sends one
contiguous tensor. A hook on each parameter records which ones received a gradient, so a
parameter the step did not use is not updated (as torch.optim does with ``grad=None``).
"""

from __future__ import annotations

import torch
from torch import nn

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import SpecError
from gradhub.proto.model_state import ModelLayout, buffer_specs, layout_of


def describe(model: nn.Module) -> tuple[ModelLayout, dict[str, nn.Parameter], dict[str, nn.Parameter],
                                        dict[str, torch.Tensor]]:
    """The model's ``ModelLayout`` and its (trainable, frozen, buffers) tensors by canonical key.

    A tensor reachable under several ``state_dict`` keys (tied weights) is carried once, under
    its first key; the others become aliases.
    """
    trainable: dict[str, nn.Parameter] = {}
    frozen: dict[str, nn.Parameter] = {}
    buffers: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    params = {id(p) for p in model.parameters()}
    seen: dict[int, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor):
            raise SpecError("model", f"state_dict entry '{key}' is a {type(value).__name__}, not a tensor; "
                                     "gradhub checkpoints hold tensors only")
        if id(value) in seen:
            aliases[key] = seen[id(value)]
            continue
        seen[id(value)] = key
        if id(value) in params:
            (trainable if value.requires_grad else frozen)[key] = value  # type: ignore[assignment]
        else:
            buffers[key] = value
    if not trainable:
        raise SpecError("model", "has no trainable parameters (all have requires_grad=False)")
    layout = ModelLayout(
        trainable=Layout(tuple(trainable), tuple(tuple(p.shape) for p in trainable.values())),
        frozen=layout_of(list(frozen), [p.shape for p in frozen.values()]),
        buffers=buffer_specs(buffers),
        aliases=aliases,
    )
    return layout, trainable, frozen, buffers


class FlatModel:
    """Rebinds ``model``'s trainable parameters to views of ``self.params`` and their grads to
    views of ``self.grads``; keeps the model's buffers and frozen parameters at hand."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state, self.trainable, self.frozen, self.buffers = describe(model)
        self.layout = self.state.trainable
        named = list(self.trainable.items())
        device = named[0][1].device
        self.params = torch.empty(self.layout.numel, dtype=torch.float32, device=device)
        self.grads = torch.zeros_like(self.params)
        self._views: list[tuple[nn.Parameter, int, int]] = []
        self._used = [False] * len(named)
        offset = 0
        for i, ((_, p), n) in enumerate(zip(named, self.layout.numels, strict=True)):
            view = self.params[offset : offset + n].view_as(p)
            view.copy_(p.detach())
            p.data = view
            p.grad = self.grads[offset : offset + n].view_as(p)
            p.register_post_accumulate_grad_hook(self._marker(i))
            self._views.append((p, offset, n))
            offset += n

    def _marker(self, i: int):  # type: ignore[no-untyped-def]
        def mark(_: torch.Tensor) -> None:
            self._used[i] = True
        return mark

    def zero_grad(self) -> None:
        self.grads.zero_()
        self._used = [False] * len(self._used)

    def unused(self) -> list[int]:
        """Indexes (into the layout) of parameters that received no gradient since ``zero_grad``."""
        return [i for i, used in enumerate(self._used) if not used]

    def gather_grads(self) -> torch.Tensor:
        """The flat gradient. Backward accumulates into the views in place; if some
        module replaced a ``.grad`` (e.g. a hook), copy it back so nothing is lost."""
        for i in range(len(self._views)):
            self.gather_grad(i)
        return self.grads

    def gather_grad(self, i: int) -> None:
        """Parameter ``i``'s gradient back in its view of the flat gradient (see ``gather_grads``)."""
        p, offset, n = self._views[i]
        g = p.grad
        if g is None:
            self.grads[offset : offset + n].zero_()
            p.grad = self.grads[offset : offset + n].view_as(p)
        elif g.data_ptr() != self.grads[offset : offset + n].data_ptr():
            self.grads[offset : offset + n].copy_(g.reshape(-1))
            p.grad = self.grads[offset : offset + n].view_as(p)

    def frozen_flat(self) -> torch.Tensor | None:
        """The frozen parameters as one float32 vector (sent once, at initialisation)."""
        if not self.frozen:
            return None
        return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in self.frozen.values()])

    def buffer_values(self) -> dict[str, torch.Tensor]:
        """Copies of the buffers on the host, by key."""
        return {k: b.detach().to("cpu", copy=True) for k, b in self.buffers.items()}

    def load_buffers(self, values: dict[str, torch.Tensor]) -> None:
        """Copy the job's buffers (as pulled) into the model's."""
        with torch.no_grad():
            for k, b in self.buffers.items():
                b.copy_(values[k])
