"""Built-in models and datasets, factories, deterministic sharding, batches, losses, evaluation."""

from __future__ import annotations

import importlib
import itertools
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from gradhub.proto.contract.errors import FactoryError, SpecError
from gradhub.worker.data import (
    build_datasets,
    build_loss,
    digits,
    epoch_seed,
    evaluate,
    get_batch,
    global_batch_indices,
    steps_per_epoch,
    synthetic,
    worker_batch_indices,
)
from gradhub.worker.factories import resolve
from gradhub.worker.models import build_model, cnn, mlp, seeded_model


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh importable module of factories in tmp_path; returns its (unique) name."""
    name = f"gh_factories_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from torch.utils.data import Dataset, TensorDataset

            NOT_CALLABLE = 3

            def model(width=4):
                return nn.Linear(3, width)

            def not_a_model():
                return "a string"

            def broken_model():
                raise RuntimeError("boom")

            class Pairs(Dataset):
                def __len__(self):
                    return 10

                def __getitem__(self, i):
                    return torch.full((2,), float(i)), i % 3

            def pairs():
                return Pairs()

            def split(n=20):
                x = torch.arange(n, dtype=torch.float32).reshape(n, 1)
                return TensorDataset(x, torch.zeros(n, dtype=torch.int64)), None

            def not_a_dataset():
                return 42

            def l1(scale=1.0):
                return lambda out, y: scale * (out - y).abs().mean()

            def not_a_loss():
                return 1.5
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield name
    sys.modules.pop(name, None)


# --- factories ----------------------------------------------------------------------------------


def test_resolve_a_good_factory(factory_module: str) -> None:
    fn = resolve(f"{factory_module}:model", "model.factory")
    assert isinstance(fn(width=2), nn.Linear)
    assert resolve("torch.nn:Linear", "model.factory") is nn.Linear
    assert resolve("torch:nn.Linear", "model.factory") is nn.Linear  # dotted attribute path


def test_resolve_missing_module_says_where_to_look() -> None:
    with pytest.raises(FactoryError) as e:
        resolve("no_such_pkg_xyz.mod:fn", "model.factory")
    assert str(e.value) == (
        "model.factory 'no_such_pkg_xyz.mod:fn': module 'no_such_pkg_xyz.mod' not found "
        "(is it on the workers' path / in working_dir?)"
    )


def test_resolve_module_with_a_missing_dependency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"gh_dep_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(FactoryError, match="importing module .* failed: No module named"):
        resolve(f"{name}:fn", "dataset.factory")
    sys.modules.pop(name, None)


def test_resolve_missing_attribute_and_not_callable(factory_module: str) -> None:
    with pytest.raises(FactoryError, match=r"loss\.factory .*: '.*' has no attribute 'nope'"):
        resolve(f"{factory_module}:nope", "loss.factory")
    with pytest.raises(FactoryError, match="is a int, not a callable"):
        resolve(f"{factory_module}:NOT_CALLABLE", "model.factory")


@pytest.mark.parametrize("ref", ["no_colon", ":fn", "mod:", "a:b:c"])
def test_resolve_malformed_reference(ref: str) -> None:
    with pytest.raises(FactoryError, match=r"^model\.factory .*expected the form"):
        resolve(ref, "model.factory")


# --- models ---------------------------------------------------------------------------------------


def test_builtin_models_shapes() -> None:
    assert mlp()(torch.zeros(5, 64)).shape == (5, 10)
    assert mlp(in_features=64, hidden=[32, 16], out_features=3)(torch.zeros(5, 8, 8)).shape == (
        5,
        3,
    )
    assert mlp(hidden=[])(torch.zeros(2, 64)).shape == (2, 10)
    net = cnn()
    assert net(torch.zeros(5, 64)).shape == (5, 10)  # flat input
    assert net(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert net(torch.zeros(5, 8, 8)).shape == (5, 10)
    rgb = cnn(in_channels=3, image_size=6, channels=[4], num_classes=2)
    assert rgb(torch.zeros(2, 3 * 6 * 6)).shape == (2, 2)
    assert list(net.buffers()) == []
    assert not any(isinstance(m, nn.Dropout | nn.BatchNorm2d) for m in net.modules())


def test_build_model_by_name_and_factory(factory_module: str) -> None:
    assert isinstance(build_model("mlp", None, {"hidden": [8]}), nn.Sequential)
    model = build_model(None, f"{factory_module}:model", {"width": 7})
    assert isinstance(model, nn.Linear) and model.out_features == 7


def test_build_model_errors(factory_module: str) -> None:
    with pytest.raises(SpecError, match=r"^model\.name: unknown model 'resnet'"):
        build_model("resnet", None, {})
    with pytest.raises(SpecError, match="exactly one"):
        build_model("mlp", f"{factory_module}:model", {})
    with pytest.raises(SpecError, match="exactly one"):
        build_model(None, None, {})
    with pytest.raises(FactoryError, match=r"model\.args .*unexpected keyword argument 'depth'"):
        build_model("mlp", None, {"depth": 3})
    with pytest.raises(FactoryError, match=r"model\.args .*unexpected keyword argument 'depth'"):
        build_model(None, f"{factory_module}:model", {"depth": 3})
    with pytest.raises(FactoryError, match=r"returned a str, expected a torch\.nn\.Module"):
        build_model(None, f"{factory_module}:not_a_model", {})
    with pytest.raises(FactoryError, match="raised RuntimeError: boom"):
        build_model(None, f"{factory_module}:broken_model", {})
    with pytest.raises(SpecError, match=r"^model\.args\.hidden"):
        build_model("mlp", None, {"hidden": [0]})


def test_seeded_model_is_reproducible_and_matches_the_plain_recipe() -> None:
    a = seeded_model(7, "cnn", None, {})
    b = seeded_model(7, "cnn", None, {})
    torch.manual_seed(7)
    c = cnn()
    d = seeded_model(8, "cnn", None, {})
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb) and torch.equal(pa, pc)
    assert not torch.equal(next(a.parameters()), next(d.parameters()))


# --- datasets -------------------------------------------------------------------------------------


def test_digits_sizes_dtypes_ranges() -> None:
    train, val = digits()
    assert isinstance(train, TensorDataset) and isinstance(val, TensorDataset)
    assert (len(train), len(val)) == (1437, 360)
    x, y = train.tensors
    assert x.shape == (1437, 64) and x.dtype == torch.float32
    assert y.shape == (1437,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10)) and set(val.tensors[1].tolist()) == set(range(10))
    # the documented fixed split, independent of the global RNG
    torch.manual_seed(99)
    bunch = load_digits()
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    pixels = torch.as_tensor(bunch.data, dtype=torch.float32) / 16
    assert torch.equal(x, pixels[perm[:1437]]) and torch.equal(val.tensors[0], pixels[perm[1437:]])
    assert torch.equal(y, torch.as_tensor(bunch.target)[perm[:1437]])


def test_synthetic_is_deterministic_learnable_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    train, val = synthetic(n=500, features=6, classes=3, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert (len(train), len(val)) == (400, 100)
    x, y = train.tensors
    assert x.dtype == torch.float32 and x.shape == (400, 6) and y.dtype == torch.int64
    assert set(y.tolist()) == {0, 1, 2}
    again, _ = synthetic(n=500, features=6, classes=3, seed=4)
    assert torch.equal(again.tensors[0], x) and torch.equal(again.tensors[1], y)
    other, _ = synthetic(n=500, features=6, classes=3, seed=5)
    assert not torch.equal(other.tensors[0], x)
    # learnable: a least-squares linear probe on one-hot labels beats chance by far
    onehot = nn.functional.one_hot(y, 3).float()
    w = torch.linalg.lstsq(x, onehot).solution
    assert (val.tensors[0] @ w).argmax(1).eq(val.tensors[1]).float().mean() > 0.8


def test_build_datasets_builtin_and_factories(factory_module: str) -> None:
    train, val = build_datasets("synthetic", None, {"n": 100}, val_fraction=0.5)
    assert (len(train), len(val)) == (80, 20)  # a built-in brings its own split

    train, val = build_datasets(None, f"{factory_module}:pairs", {}, val_fraction=0.3)
    assert (len(train), len(val)) == (7, 3)
    again, _ = build_datasets(None, f"{factory_module}:pairs", {}, val_fraction=0.3)
    assert list(train.indices) == list(again.indices)  # deterministic split
    assert sorted([*train.indices, *val.indices]) == list(range(10))

    train, val = build_datasets(None, f"{factory_module}:pairs", {}, val_fraction=0)
    assert len(train) == 10 and val is None

    train, val = build_datasets(None, f"{factory_module}:split", {"n": 6}, val_fraction=0.5)
    assert len(train) == 6 and val is None


def test_build_datasets_errors(factory_module: str) -> None:
    with pytest.raises(FactoryError, match=r"^dataset\.factory .*returned a int"):
        build_datasets(None, f"{factory_module}:not_a_dataset", {}, 0.1)
    with pytest.raises(SpecError, match=r"^dataset\.name: unknown dataset 'mnist'"):
        build_datasets("mnist", None, {}, 0.1)
    with pytest.raises(SpecError, match=r"^dataset\.val_fraction"):
        build_datasets("digits", None, {}, 1.0)
    with pytest.raises(FactoryError, match=r"dataset\.args .*unexpected keyword argument"):
        build_datasets("digits", None, {"n": 3}, 0.1)


# --- sharding -------------------------------------------------------------------------------------


def test_steps_per_epoch() -> None:
    assert steps_per_epoch(100, 32) == 3
    with pytest.raises(SpecError, match=r"^batch_size: .*larger than the 10 training samples"):
        steps_per_epoch(10, 16)


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_worker_slices_make_up_the_global_batch(world_size: int) -> None:
    n, batch, seed = 101, 5, 9
    for step in range(25):
        parts = [
            worker_batch_indices(n, batch, world_size, r, seed, step) for r in range(world_size)
        ]
        assert all(p.shape == (batch,) and p.dtype == torch.int64 for p in parts)
        assert torch.equal(
            torch.cat(parts), global_batch_indices(n, batch * world_size, seed, step)
        )


def test_sharding_is_a_pure_function() -> None:
    first = [worker_batch_indices(50, 4, 2, 1, 3, s) for s in range(20)]
    global_batch_indices(50, 8, 3, 0)[:] = -1  # mutating a result must not corrupt the cache
    again = [worker_batch_indices(50, 4, 2, 1, 3, s) for s in reversed(range(20))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    g = torch.Generator().manual_seed(epoch_seed(3, 0))
    assert torch.equal(global_batch_indices(50, 8, 3, 0), torch.randperm(50, generator=g)[:8])


def test_every_sample_once_per_epoch_and_epochs_reshuffle() -> None:
    n, batch, world, seed = 64, 4, 2, 11
    spe = steps_per_epoch(n, batch * world)
    epochs = []
    for epoch in range(3):
        seen = torch.cat(
            [
                worker_batch_indices(n, batch, world, r, seed, epoch * spe + k)
                for k, r in itertools.product(range(spe), range(world))
            ]
        )
        assert sorted(seen.tolist()) == list(range(n))
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert not torch.equal(
        global_batch_indices(n, 8, seed, 0), global_batch_indices(n, 8, seed + 1, 0)
    )


def test_sharding_argument_errors() -> None:
    with pytest.raises(SpecError, match="^rank"):
        worker_batch_indices(10, 2, 2, 2, 0, 0)
    with pytest.raises(SpecError, match="^step"):
        global_batch_indices(10, 2, 0, -1)


# --- batches, losses, evaluation -------------------------------------------------------------------


class _Pairs(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((2,), float(i)), i


def test_get_batch_paths_agree() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2) // 2
    y = torch.arange(6)
    tensors = TensorDataset(x, y)
    idx = torch.tensor([4, 0, 2])
    for ds in (tensors, _Pairs()):
        bx, by = get_batch(ds, idx)
        assert torch.equal(bx, x[idx]) and torch.equal(by, y[idx])
    sub = Subset(tensors, [5, 3, 1])
    bx, by = get_batch(sub, torch.tensor([2, 0]))
    assert torch.equal(by, torch.tensor([1, 5])) and torch.equal(bx, x[[1, 5]])
    bx, by = get_batch(Subset(_Pairs(), [5, 3, 1]), [1])
    assert by.tolist() == [3]


def test_build_loss(factory_module: str) -> None:
    out, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    ce = build_loss("cross_entropy", None, {"label_smoothing": 0.1})
    assert torch.equal(ce(out, y), nn.CrossEntropyLoss(label_smoothing=0.1)(out, y))
    mse = build_loss("mse", None, {})
    assert float(mse(torch.ones(3), torch.zeros(3))) == 1.0
    l1 = build_loss(None, f"{factory_module}:l1", {"scale": 2.0})
    assert float(l1(torch.ones(3), torch.zeros(3))) == 2.0
    with pytest.raises(FactoryError, match=r"^loss\.factory .*expected a callable loss"):
        build_loss(None, f"{factory_module}:not_a_loss", {})
    with pytest.raises(SpecError, match=r"^loss\.name"):
        build_loss("hinge", None, {})


class _Oracle(nn.Module):
    """A perfect classifier for TensorDataset(x, y) with x = one_hot(y) * 5."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.training and not torch.is_grad_enabled()
        return x * self.scale


def test_evaluate_perfect_classifier_and_mode_restore() -> None:
    y = torch.arange(25) % 4
    ds = TensorDataset(nn.functional.one_hot(y, 4).float() * 5, y)
    model = _Oracle()
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    metrics = evaluate(model, ds, loss_fn, batch_size=7)
    assert model.training
    assert metrics["val_accuracy"] == 1.0
    expected = float(loss_fn(ds.tensors[0], y))
    assert metrics["val_loss"] == pytest.approx(expected)


def test_evaluate_regression_has_no_accuracy() -> None:
    ds = TensorDataset(torch.ones(10, 3), torch.zeros(10, 2))
    model = nn.Linear(3, 2)
    nn.init.zeros_(model.weight)
    nn.init.constant_(model.bias, 2.0)
    metrics = evaluate(model, ds, nn.MSELoss(), batch_size=3)
    assert metrics == {"val_loss": pytest.approx(4.0)}


def test_training_on_digits_learns() -> None:
    train, val = digits()
    model = seeded_model(0, "mlp", None, {"hidden": [64]})
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = build_loss("cross_entropy", None, {})
    before = evaluate(model, val, loss_fn)
    for step in range(60):
        x, y = get_batch(train, worker_batch_indices(len(train), 64, 1, 0, 0, step))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    after = evaluate(model, val, loss_fn)
    assert after["val_loss"] < before["val_loss"] and after["val_accuracy"] > 0.85
