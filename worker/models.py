"""Built-in models and model construction from a spec (a built-in name or a user factory).

The initial parameters of a job are defined as ``torch.manual_seed(seed)`` followed by
``build_model(...)`` (see :func:`seeded_model`), so a user can rebuild them in plain PyTorch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradhub.proto.contract.errors import FactoryError, SpecError
from gradhub.worker.factories import call_factory, resolve_component


def mlp(in_features: int = 64, hidden: Sequence[int] = (128,), out_features: int = 10) -> nn.Module:
    """A multilayer perceptron: ``Linear + ReLU`` per ``hidden`` width, then a ``Linear`` head.

    Inputs are flattened beyond the batch dimension, so (B, 8, 8) works like (B, 64).
    """
    widths = [_positive(in_features, "in_features"), *_positive_list(hidden, "hidden")]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], _positive(out_features, "out_features")))
    return nn.Sequential(*layers)


class _SmallCNN(nn.Module):
    """3x3 convolutions with ReLU at full resolution, then flatten and a linear classifier."""

    def __init__(
        self, in_channels: int, image_size: int, channels: Sequence[int], num_classes: int
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.image_size = image_size
        layers: list[nn.Module] = []
        prev = in_channels
        for c in channels:
            layers += [nn.Conv2d(prev, c, kernel_size=3, padding=1), nn.ReLU()]
            prev = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev * image_size * image_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.in_channels, self.image_size
        if x.dim() == 2:  # flat pixels (B, C*H*W)
            x = x.reshape(x.shape[0], c, s, s)
        elif x.dim() == 3 and c == 1:  # (B, H, W) grey images
            x = x.unsqueeze(1)
        return self.head(torch.flatten(self.features(x), 1))


def cnn(
    in_channels: int = 1,
    image_size: int = 8,
    channels: Sequence[int] = (16, 32),
    num_classes: int = 10,
) -> nn.Module:
    """A small CNN for ``image_size`` x ``image_size`` images; accepts flat (B, C*H*W) input.

    ``Conv2d(3x3, padding=1) + ReLU`` per ``channels`` entry, then flatten and ``Linear``.
    No pooling, dropout or batch norm: no buffers, and deterministic forward and backward.
    """
    return _SmallCNN(
        _positive(in_channels, "in_channels"),
        _positive(image_size, "image_size"),
        _positive_list(channels, "channels"),
        _positive(num_classes, "num_classes"),
    )


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn}


def build_model(name: str | None, factory: str | None, args: Mapping[str, Any]) -> nn.Module:
    """Build the model named by exactly one of ``name`` (a built-in) or ``factory`` (a reference).

    ``args`` are passed as keyword arguments. The result must be an ``nn.Module``.
    """
    fn, label = resolve_component("model", name, factory, BUILTIN_MODELS)
    model = call_factory(fn, args, label=label, args_field="model.args")
    if not isinstance(model, nn.Module):
        raise FactoryError(f"{label} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def seeded_model(
    seed: int, name: str | None, factory: str | None, args: Mapping[str, Any]
) -> nn.Module:
    """The job's initial model: exactly ``torch.manual_seed(seed); build_model(name, factory, args)``.

    This is the documented contract for initial parameters: the same two lines in a user's
    script give bit-identical parameters (for a factory that draws only from torch's global RNG).
    """
    torch.manual_seed(seed)
    return build_model(name, factory, args)


def _positive(value: Any, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"model.args.{arg}", f"must be a positive integer, got {value!r}")
    return value


def _positive_list(values: Any, arg: str) -> list[int]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise SpecError(f"model.args.{arg}", f"must be a list of positive integers, got {values!r}")
    return [_positive(v, arg) for v in values]
