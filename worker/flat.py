"""A model whose parameters and gradients are views into two flat float32 buffers.

Pulled parameters land in one buffer with one copy, and backward() accumulates
straight into the flat gradient (as DDP's ``gradient_as_bucket_view`` does), so
a push sends one contiguous tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from gradhub.proto.codec import Layout


class FlatModel:
    """Rebinds ``model``'s parameters to views of ``self.params`` and grads to ``self.grads``."""

    def __init__(self, model: nn.Module) -> None:
        named = list(model.named_parameters())
        if not named:
            raise ValueError("model: has no parameters to train")
        self.model = model
        self.layout = Layout(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))
        device = named[0][1].device
        self.params = torch.empty(self.layout.numel, dtype=torch.float32, device=device)
        self.grads = torch.zeros_like(self.params)
        self._views = []
        offset = 0
        for (_, p), n in zip(named, self.layout.numels, strict=True):
            view = self.params[offset : offset + n].view_as(p)
            view.copy_(p.detach())
            p.data = view
            p.grad = self.grads[offset : offset + n].view_as(p)
            self._views.append((p, offset, n))
            offset += n

    def zero_grad(self) -> None:
        self.grads.zero_()

    def gather_grads(self) -> torch.Tensor:
        """The flat gradient. Backward accumulates into the views in place; if some
        module replaced a ``.grad`` (e.g. a hook), copy it back so nothing is lost."""
        for p, offset, n in self._views:
            g = p.grad
            if g is None:
                self.grads[offset : offset + n].zero_()
                p.grad = self.grads[offset : offset + n].view_as(p)
            elif g.data_ptr() != self.grads[offset : offset + n].data_ptr():
                self.grads[offset : offset + n].copy_(g.reshape(-1))
                p.grad = self.grads[offset : offset + n].view_as(p)
        return self.grads
