"""Datasets, deterministic sharding into per-worker batches, losses and evaluation.

Which samples a worker uses at a step is a pure function of (dataset size, batch size, world
size, rank, seed, step), so a restarted worker recomputes exactly the gradient it lost.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset, random_split
from torch.utils.data.dataloader import default_collate

from gradhub.proto.contract.errors import FactoryError, SpecError
from gradhub.worker.factories import call_factory, resolve_component

LossFn = Callable[[Any, Any], torch.Tensor]  # (model output, target) -> scalar

_DIGITS_TRAIN = 1437  # of 1,797; the last 360 of the fixed permutation are the validation set
_EPOCH_MIX = 1_000_003  # data-order seed of an epoch: (seed * _EPOCH_MIX + epoch) mod 2**63


# --- built-in datasets ------------------------------------------------------------------------


def digits() -> tuple[Dataset, Dataset]:
    """scikit-learn's 8x8 digits: 1,437 training and 360 validation samples.

    ``x`` is the 64 pixels / 16 as float32 (values in [0, 1]), ``y`` the int64 class 0..9. The
    split is fixed, independent of any job seed: ``torch.randperm(1797,
    generator=torch.Generator().manual_seed(0))``, first 1,437 train, the rest validation.
    """
    pixels, labels = _digits_arrays()
    x = torch.as_tensor(pixels, dtype=torch.float32) / 16.0
    y = torch.as_tensor(labels, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:_DIGITS_TRAIN], perm[_DIGITS_TRAIN:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def _digits_arrays() -> tuple[Any, Any]:
    """The digits' pixels and labels (numpy), read from the file scikit-learn ships them in,
    as its ``load_digits`` reads them, without importing scikit-learn: that import costs 2 s
    of CPU, in every worker process (``find_spec`` locates the package without importing
    it). Where the file is not where scikit-learn keeps it, ``load_digits`` itself."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    path = None if spec is None or spec.origin is None else \
        Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if path is not None and path.is_file():
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


def synthetic(
    n: int = 4096, features: int = 64, classes: int = 10, seed: int = 0, noise: float = 0.1
) -> tuple[Dataset, Dataset]:
    """A learnable synthetic classification set: the first 80% train, the rest validation.

    ``x ~ N(0, 1)`` of shape (``features``,); ``y = argmax(x @ W + noise * eps)`` for a fixed
    random teacher ``W``. Everything is drawn from ``torch.Generator().manual_seed(seed)``; the
    global RNG is not touched.
    """
    for value, arg in ((n, "n"), (features, "features"), (classes, "classes")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"dataset.args.{arg}", f"must be a positive integer, got {value!r}")
    if n < 2:
        raise SpecError("dataset.args.n", f"must be at least 2 (train and validation), got {n}")
    if isinstance(noise, bool) or not isinstance(noise, int | float) or not noise >= 0:
        raise SpecError("dataset.args.noise", f"must be a number >= 0, got {noise!r}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    teacher = torch.randn(features, classes, generator=g) / math.sqrt(features)
    logits = x @ teacher + noise * torch.randn(n, classes, generator=g)
    y = logits.argmax(dim=1)
    n_train = max(1, min(n - 1, int(n * 0.8)))
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


BUILTIN_DATASETS: dict[str, Callable[..., tuple[Dataset, Dataset]]] = {
    "digits": digits,
    "synthetic": synthetic,
}


def build_datasets(
    name: str | None, factory: str | None, args: Mapping[str, Any], val_fraction: float
) -> tuple[Dataset, Dataset | None]:
    """The (train, validation) datasets named by exactly one of ``name`` or ``factory``.

    A factory returns a map-style dataset of ``(x, y)`` samples, or a ``(train, val)`` tuple
    (``val`` may be ``None``). A single dataset is split with ``val_fraction`` by
    ``random_split(..., generator=torch.Generator().manual_seed(0))``; 0 means no validation.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float):
        raise SpecError("dataset.val_fraction", f"must be a number in [0, 1), got {val_fraction!r}")
    if not 0 <= val_fraction < 1:
        raise SpecError("dataset.val_fraction", f"must be in [0, 1), got {val_fraction!r}")
    fn, label = resolve_component("dataset", name, factory, BUILTIN_DATASETS)
    result = call_factory(fn, args, label=label, args_field="dataset.args")

    if isinstance(result, tuple):
        if len(result) != 2:
            raise FactoryError(
                f"{label} returned a tuple of {len(result)}; expected a dataset or (train, val)"
            )
        train, val = result
        _check_dataset(train, f"{label} (train)")
        if val is not None:
            _check_dataset(val, f"{label} (val)")
        return train, val
    _check_dataset(result, label)
    if val_fraction == 0:
        return result, None
    n = len(result)
    n_val = int(n * val_fraction)
    if n_val < 1 or n_val >= n:
        raise SpecError(
            "dataset.val_fraction",
            f"{val_fraction} of {n} samples leaves an empty training or validation set",
        )
    train, val = random_split(
        result, [n - n_val, n_val], generator=torch.Generator().manual_seed(0)
    )
    return train, val


def _check_dataset(ds: Any, label: str) -> None:
    if isinstance(ds, IterableDataset) or not (
        hasattr(ds, "__getitem__") and hasattr(ds, "__len__")
    ):
        raise FactoryError(
            f"{label} returned a {type(ds).__name__}; expected a map-style Dataset of (x, y) "
            "samples (with __len__ and __getitem__) or a (train, val) tuple of them"
        )
    if len(ds) == 0:
        raise FactoryError(f"{label} returned an empty dataset")


# --- sharding ---------------------------------------------------------------------------------


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Full global batches per epoch (the last partial batch is dropped)."""
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise SpecError("batch_size", f"the global batch must be >= 1, got {global_batch!r}")
    steps = n // global_batch
    if steps == 0:
        raise SpecError(
            "batch_size",
            f"the global batch of {global_batch} (batch_size x world_size) is larger than the "
            f"{n} training samples",
        )
    return steps


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of ``epoch``'s permutation: ``(seed * 1_000_003 + epoch) % 2**63``."""
    return (seed * _EPOCH_MIX + epoch) % (1 << 63)


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def global_batch_indices(n: int, global_batch: int, seed: int, step: int) -> torch.Tensor:
    """The sample indices of the whole world's batch at ``step`` (int64, ``global_batch`` long).

    Epoch ``e`` visits ``torch.randperm(n, generator=torch.Generator().manual_seed(
    epoch_seed(seed, e)))`` in consecutive slices of ``global_batch``; a pure function.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise SpecError("step", f"must be an integer >= 0, got {step!r}")
    epoch, k = divmod(step, steps_per_epoch(n, global_batch))
    return _permutation(n, seed, epoch)[k * global_batch : (k + 1) * global_batch].clone()


def worker_batch_indices(
    n: int, batch_size: int, world_size: int, rank: int, seed: int, step: int,
    share: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Worker ``rank``'s ``batch_size`` indices: its contiguous slice of the global batch.

    An elastic job keeps its global batch (``batch_size * world_size``, ``world_size`` its
    largest size) whatever its size now: ``share`` = (index, count) cuts it into ``count``
    contiguous slices whose lengths differ by at most one, and returns slice ``index``."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise SpecError("world_size", f"must be an integer >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise SpecError("rank", f"must be in [0, {world_size}), got {rank!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpecError("batch_size", f"must be an integer >= 1, got {batch_size!r}")
    batch = global_batch_indices(n, batch_size * world_size, seed, step)
    if share is not None:
        lo, hi = share_bounds(batch_size * world_size, *share)
        return batch[lo:hi]
    return batch[rank * batch_size : (rank + 1) * batch_size]


def share_bounds(global_batch: int, index: int, count: int) -> tuple[int, int]:
    """Where slice ``index`` of ``count`` of a global batch starts and ends."""
    if not 0 <= index < count:
        raise SpecError("rank", f"must be in [0, {count}), got {index!r}")
    return index * global_batch // count, (index + 1) * global_batch // count


def share_weight(global_batch: int, index: int, count: int) -> float:
    """What a worker's gradient (the mean over its slice) is scaled by so that the mean over
    the ``count`` workers' gradients is the global batch's mean: 1.0 for equal slices."""
    lo, hi = share_bounds(global_batch, index, count)
    return (hi - lo) * count / global_batch


# --- batches ----------------------------------------------------------------------------------


def get_batch(dataset: Dataset, indices: torch.Tensor | Sequence[int]) -> tuple[Any, Any]:
    """The ``(x, y)`` batch of ``dataset`` at ``indices``.

    A ``TensorDataset`` (or a ``Subset`` of one) is indexed directly; any other dataset goes
    through ``default_collate([dataset[i] for i in indices])`` (``Subset``s are mapped through),
    so ``x`` and ``y`` may be tensors, tuples or mappings of them, nested.
    """
    idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    while isinstance(dataset, Subset):  # map through (nested) subsets to the base dataset
        outer = dataset.indices
        idx = [int(outer[i]) for i in idx]
        dataset = dataset.dataset
    if isinstance(dataset, TensorDataset):
        tensors = dataset.tensors
        if len(tensors) != 2:
            raise FactoryError(
                f"dataset: a TensorDataset must hold exactly (x, y), it holds {len(tensors)} tensors"
            )
        rows = torch.tensor(idx, dtype=torch.int64)
        return tensors[0][rows], tensors[1][rows]
    batch = default_collate([dataset[i] for i in idx])
    if not isinstance(batch, list | tuple) or len(batch) != 2:
        raise FactoryError(
            f"dataset: samples must be (x, y) pairs, got a batch of type {type(batch).__name__}"
        )
    x, y = batch
    return x, y


# --- inputs and outputs as users write them ---------------------------------------------------


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor in it (nested in tuples, lists and mappings) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def call_model(model: Callable[..., Any], x: Any) -> Any:
    """``model(x)`` for a tensor, ``model(*x)`` for a tuple or list, ``model(**x)`` for a mapping."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, tuple | list):
        return model(*x)
    return model(x)


def batch_len(x: Any) -> int:
    """The batch size of an input: the first dimension of its first tensor."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() else 1
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, tuple | list) else ()
    for v in values:
        n = batch_len(v)
        if n:
            return n
    return 0


def split_batch(obj: Any, parts: int) -> list[Any]:
    """``obj`` cut into ``parts`` equal micro-batches along the first dimension of every tensor."""
    if parts == 1:
        return [obj]
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0 or obj.shape[0] % parts:
            raise SpecError("accumulate", f"cannot split a batch of {obj.shape[0] if obj.dim() else 0} "
                                          f"samples into {parts} equal micro-batches")
        return list(obj.chunk(parts))
    if isinstance(obj, Mapping):
        split = {k: split_batch(v, parts) for k, v in obj.items()}
        return [{k: v[i] for k, v in split.items()} for i in range(parts)]
    if isinstance(obj, tuple | list):
        items = [split_batch(v, parts) for v in obj]
        return [type(obj)(v[i] for v in items) for i in range(parts)]
    return [obj] * parts


def logits_of(out: Any) -> torch.Tensor | None:
    """The class scores in a model's output: the tensor itself, the first element of a tuple,
    or ``logits`` of a mapping or output object (Hugging Face); None when there are none."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        found = out.get("logits")
    elif isinstance(out, tuple | list):
        found = out[0] if out else None
    else:
        found = getattr(out, "logits", None)
    return found if isinstance(found, torch.Tensor) else None


def loss_of(out: Any) -> torch.Tensor:
    """The loss a model computed itself (``loss: model``): ``out.loss`` or ``out["loss"]``."""
    found = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not isinstance(found, torch.Tensor):
        raise FactoryError(f"loss 'model': the model returned a {type(out).__name__} without a 'loss' tensor "
                           "(pass the labels in the inputs, as Hugging Face models take them)")
    return found


class _OnLogits:
    """A built-in loss applied to the class scores in whatever the model returns."""

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.loss = loss

    def __call__(self, out: Any, y: Any) -> torch.Tensor:
        logits = logits_of(out)
        if logits is None:
            raise FactoryError(f"loss: the model returned a {type(out).__name__} with no tensor of class "
                               "scores (a tensor, a tuple starting with one, or 'logits'); give a loss factory")
        return self.loss(logits, y)


def _model_loss() -> LossFn:
    return lambda out, y: loss_of(out)


# --- losses and evaluation --------------------------------------------------------------------


BUILTIN_LOSSES: dict[str, Callable[..., LossFn]] = {
    "cross_entropy": lambda **args: _OnLogits(nn.CrossEntropyLoss(**args)),
    "mse": lambda **args: _OnLogits(nn.MSELoss(**args)),
    "model": _model_loss,
}

MetricFn = Callable[[Any, Any], Mapping[str, float]]


def build_loss(name: str | None, factory: str | None, args: Mapping[str, Any]) -> LossFn:
    """The loss ``loss_fn(output, target) -> scalar`` named by exactly one of name or factory.

    Built-ins: ``cross_entropy`` (``nn.CrossEntropyLoss(**args)``) and ``mse``
    (``nn.MSELoss(**args)``) on the output's class scores (``logits_of``), and ``model`` (the
    loss the model returns, ``output.loss``); a factory is called with ``**args`` and must
    return a callable, which receives the model's output as it is.
    """
    fn, label = resolve_component("loss", name, factory, BUILTIN_LOSSES)
    loss = call_factory(fn, args, label=label, args_field="loss.args")
    if not callable(loss):
        raise FactoryError(f"{label} returned a {type(loss).__name__}, expected a callable loss")
    return loss


def build_metrics(factory: str | None, args: Mapping[str, Any]) -> MetricFn | None:
    """The user's metric function ``fn(output, target) -> {name: value}`` (one batch), or None."""
    if factory is None:
        return None
    fn, label = resolve_component("metrics", None, factory, {})
    metric = call_factory(fn, args, label=label, args_field="metrics.args")
    if not callable(metric):
        raise FactoryError(f"{label} returned a {type(metric).__name__}, expected a callable "
                           "fn(output, target) -> {name: value}")
    return metric


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: LossFn,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
    metrics: MetricFn | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, float]:
    """Validation metrics of ``model`` on ``dataset``, in eval mode and without gradients.

    ``val_loss`` is the sample-weighted mean of ``loss_fn`` over batches (so ``loss_fn`` should
    average over its batch); ``val_accuracy`` (0..1) is added when the output carries class
    scores for integer targets (``(B, C)`` for ``(B,)``, or one more dimension than the
    targets; targets < 0 are ignored, as Hugging Face's -100). ``metrics`` values are
    averaged the same way as ``val_<name>``. The model's train/eval mode is restored afterwards.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise SpecError("dataset", "the validation set is empty")
    if batch_size < 1:
        raise SpecError("batch_size", f"must be >= 1, got {batch_size!r}")
    was_training = model.training
    model.eval()
    total_loss, correct, counted, classified = 0.0, 0, 0, True
    sums: dict[str, float] = {}
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                x, y = get_batch(dataset, range(start, min(start + batch_size, n)))
                x, y = to_device(x, device), to_device(y, device)
                size = batch_len(x) or len(y)
                with autocast():
                    out = call_model(model, x)
                    loss = loss_fn(out, y)
                total_loss += float(loss) * size
                hits = _hits(logits_of(out), y) if classified else None
                if hits is None:
                    classified = False
                else:
                    correct += hits[0]
                    counted += hits[1]
                if metrics is not None:
                    for key, value in metrics(out, y).items():
                        sums[key] = sums.get(key, 0.0) + float(value) * size
    finally:
        model.train(was_training)
    out_metrics = {"val_loss": total_loss / n}
    if classified and counted:
        out_metrics["val_accuracy"] = correct / counted
    out_metrics.update({f"val_{k}": v / n for k, v in sums.items()})
    return out_metrics


def _hits(logits: torch.Tensor | None, y: Any) -> tuple[int, int] | None:
    """(correct, counted) when ``logits`` are class scores for the integer targets ``y``."""
    if logits is None or not isinstance(y, torch.Tensor) or not _is_integer(y):
        return None
    if logits.dim() != y.dim() + 1 or tuple(logits.shape[:-1]) != tuple(y.shape):
        return None
    keep = y >= 0
    return int(((logits.argmax(dim=-1) == y) & keep).sum()), int(keep.sum())


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of worker ``rank`` at ``step`` (dropout and any other randomness):
    ``((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63``."""
    return ((seed * _EPOCH_MIX + rank) * _EPOCH_MIX + step) % (1 << 63)
