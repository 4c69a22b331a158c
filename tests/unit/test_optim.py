"""Server-side optimizers and LR schedules equal their plain torch.optim construction."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
    StepLR,
)

from gradhub.proto.contract.errors import SpecError
from gradhub.proto.contract.optim import (
    HYPERPARAMETERS,
    OPTIMIZERS,
    build_optimizer,
    build_scheduler,
)

HYPER: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.9, "dampening": 0.0, "weight_decay": 1e-4, "nesterov": True},
    "adam": {"betas": [0.8, 0.99], "eps": 1e-7, "weight_decay": 0.01, "amsgrad": True},
    "adamw": {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.05, "amsgrad": False},
    "adagrad": {
        "lr_decay": 0.01,
        "weight_decay": 1e-4,
        "initial_accumulator_value": 0.1,
        "eps": 1e-10,
    },
    "rmsprop": {"alpha": 0.9, "eps": 1e-6, "weight_decay": 1e-4, "momentum": 0.5, "centered": True},
    "adadelta": {"rho": 0.8, "eps": 1e-5, "weight_decay": 1e-4},
}


def _tiny_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_hyperparameter_table_covers_every_optimizer() -> None:
    assert set(OPTIMIZERS) == set(HYPERPARAMETERS) == set(HYPER)
    for name, hyper in HYPER.items():
        assert set(hyper) == HYPERPARAMETERS[name]


@pytest.mark.parametrize("name", sorted(HYPER))
def test_optimizer_equals_plain_torch_step_for_step(name: str) -> None:
    hyper = HYPER[name]
    ours_model, plain_model = _tiny_model(), _tiny_model()
    ours = build_optimizer(ours_model.parameters(), name, 0.05, hyper)
    plain_hyper = {k: tuple(v) if k == "betas" else v for k, v in hyper.items()}
    plain = OPTIMIZERS[name](plain_model.parameters(), lr=0.05, **plain_hyper)

    assert type(ours) is type(plain)
    assert ours.param_groups[0].keys() == plain.param_groups[0].keys()
    for key, value in plain_hyper.items():
        assert ours.param_groups[0][key] == value
    if "betas" in hyper:
        assert isinstance(ours.param_groups[0]["betas"], tuple)
    assert {k: v for k, v in ours.defaults.items()} == plain.defaults

    _train(ours_model, ours, 5)
    _train(plain_model, plain, 5)
    for a, b in zip(ours_model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(a, b)
    fresh = _tiny_model()
    assert not all(  # it did train
        torch.equal(a, b) for a, b in zip(ours_model.parameters(), fresh.parameters(), strict=True)
    )


# each optimizer with torch's defaults and with the spec's options that change its update
FOREACH_CASES = [(name, hyper) for name in sorted(HYPER) for hyper in ({}, HYPER[name])] + [
    ("sgd", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("adamw", {"amsgrad": True, "weight_decay": 0.1}),
    ("rmsprop", {"momentum": 0.5}),
]


@pytest.mark.parametrize(("name", "hyper"), FOREACH_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FOREACH_CASES)])
def test_the_parameter_servers_multi_tensor_optimizer_takes_the_same_steps_bit_for_bit(name: str, hyper: dict) -> None:
    """The server builds its optimizers with ``foreach=True``; a user's script on CPU gets the
    single-tensor loop. Over tensors of several shapes, one of which gets no gradient every
    third step (an unused parameter: both leave it alone), the two are bitwise equal."""
    shapes = [(16, 1, 3, 3), (16,), (10, 300), (10,), (7,)]

    def run(foreach: bool | None) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        opt = build_optimizer(params, name, 0.01, hyper, foreach=foreach)
        for step in range(12):
            for i, p in enumerate(params):
                p.grad = None if (i == 4 and step % 3 == 0) else torch.randn(p.shape, generator=g)
            opt.step()
        return [p.detach() for p in params]

    single, multi = run(None), run(True)
    assert all(torch.equal(a, b) for a, b in zip(single, multi, strict=True))
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(single[0], torch.randn(shapes[0], generator=g))  # it did train


def test_plain_tensors_as_parameters() -> None:
    p = torch.ones(3)
    opt = build_optimizer([p], "sgd", 0.5, {})
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(p, torch.full((3,), 0.5))


def test_unknown_optimizer_names_the_field() -> None:
    with pytest.raises(SpecError, match=r"^optimizer\.name: unknown optimizer 'lamb'") as e:
        build_optimizer([torch.ones(1)], "lamb", 0.1, {})
    assert e.value.field == "optimizer.name"


@pytest.mark.parametrize(
    ("name", "lr", "hyper", "field"),
    [
        ("sgd", 0.1, {"betas": [0.9, 0.99]}, "optimizer.hyper"),
        ("adam", 0.1, {"lr": 0.2}, "optimizer.hyper"),
        ("adam", 0.1, {"betas": [0.9]}, "optimizer.hyper.betas"),
        ("adam", 0.1, {"betas": [0.9, 1.5]}, "optimizer.hyper"),
        ("sgd", -1.0, {}, "optimizer.lr"),
        ("sgd", float("nan"), {}, "optimizer.lr"),
    ],
)
def test_bad_optimizer_values(name: str, lr: float, hyper: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as e:
        build_optimizer([torch.ones(1)], name, lr, hyper)
    assert e.value.field == field


# --- schedules ----------------------------------------------------------------------------------


def _lrs(schedule: dict[str, Any] | None, steps: int, total_steps: int = 100) -> list[float]:
    """The learning rate used by each of ``steps`` optimizer steps (warnings are errors)."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], "sgd", 1.0, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = build_scheduler(opt, schedule, total_steps)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            p.grad = torch.ones(2)
            opt.step()
            if sched is not None:
                sched.step()
    return out


def test_no_schedule_and_constant_schedule_build_nothing() -> None:
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], "sgd", 0.3, {})
    assert build_scheduler(opt, None, 10) is None
    assert build_scheduler(opt, {"name": "constant"}, 10) is None
    assert build_scheduler(opt, {"name": "constant", "warmup_steps": 0}, 10) is None
    assert _lrs({"name": "constant"}, 4) == [1.0] * 4


def test_step_schedule() -> None:
    lrs = _lrs({"name": "step", "step_size": 2, "gamma": 0.5}, 7)
    assert lrs == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25, 0.125])


def test_step_schedule_default_gamma() -> None:
    assert _lrs({"name": "step", "step_size": 3}, 7) == pytest.approx([1] * 3 + [0.1] * 3 + [0.01])


def _cosine(t: int, t_max: int, eta_min: float = 0.0) -> float:
    return eta_min + (1 - eta_min) * (1 + math.cos(math.pi * t / t_max)) / 2


def test_cosine_schedule() -> None:
    lrs = _lrs({"name": "cosine", "t_max": 4, "eta_min": 0.1}, 5)
    assert lrs == pytest.approx([_cosine(t, 4, 0.1) for t in range(5)], abs=1e-12)
    assert lrs[-1] == pytest.approx(0.1)


def test_cosine_t_max_defaults_to_the_steps_after_warmup() -> None:
    lrs = _lrs({"name": "cosine"}, 11, total_steps=10)
    assert lrs == pytest.approx([_cosine(t, 10) for t in range(11)], abs=1e-12)
    lrs = _lrs({"name": "cosine", "warmup_steps": 2, "warmup_start_factor": 0.5}, 11, 10)
    assert lrs[:2] == pytest.approx([0.5, 0.75])
    assert lrs[2:] == pytest.approx([_cosine(t, 8) for t in range(9)], abs=1e-12)


def test_constant_with_warmup_is_linear_lr_alone() -> None:
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], "sgd", 1.0, {})
    sched = build_scheduler(opt, {"name": "constant", "warmup_steps": 4}, 10)
    assert type(sched) is LinearLR
    lrs = _lrs({"name": "constant", "warmup_steps": 4, "warmup_start_factor": 0.25}, 7)
    assert lrs == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1, 1, 1])


def test_default_warmup_start_factor() -> None:
    assert _lrs({"name": "constant", "warmup_steps": 2}, 3) == pytest.approx([0.1, 0.55, 1.0])


def test_step_with_warmup() -> None:
    schedule = {
        "name": "step",
        "warmup_steps": 2,
        "warmup_start_factor": 0.5,
        "step_size": 2,
        "gamma": 0.1,
    }
    assert _lrs(schedule, 7) == pytest.approx([0.5, 0.75, 1, 1, 0.1, 0.1, 0.01])


def test_cosine_with_warmup() -> None:
    schedule = {"name": "cosine", "warmup_steps": 3, "warmup_start_factor": 0.4, "t_max": 4}
    lrs = _lrs(schedule, 8)
    assert lrs[:3] == pytest.approx([0.4, 0.6, 0.8])
    assert lrs[3:] == pytest.approx([_cosine(t, 4) for t in range(5)], abs=1e-12)


def _plain_recipe(opt: torch.optim.Optimizer, s: dict[str, Any], total: int) -> LRScheduler | None:
    """The plain-PyTorch recipe from build_scheduler's docstring."""
    warmup = s.get("warmup_steps", 0)
    main: LRScheduler | None = None
    warm = None
    if warmup > 0:
        warm = LinearLR(
            opt, start_factor=s.get("warmup_start_factor", 0.1), end_factor=1.0, total_iters=warmup
        )
    if s["name"] == "step":
        main = StepLR(opt, s["step_size"], s.get("gamma", 0.1))
    elif s["name"] == "cosine":
        t_max = s.get("t_max") or max(1, total - warmup)
        main = CosineAnnealingLR(opt, t_max, s.get("eta_min", 0.0))
    if warm is None:
        return main
    return warm if main is None else SequentialLR(opt, [warm, main], milestones=[warmup])


SCHEDULES_TO_REPRODUCE = [
    {"name": "constant", "warmup_steps": 3},
    {"name": "step", "step_size": 3, "gamma": 0.7},
    {"name": "step", "step_size": 2, "warmup_steps": 4, "warmup_start_factor": 0.3},
    {"name": "cosine", "eta_min": 0.01},
    {"name": "cosine", "warmup_steps": 5, "eta_min": 0.001},
]


@pytest.mark.parametrize("schedule", SCHEDULES_TO_REPRODUCE)
def test_schedule_and_optimizer_equal_the_plain_pytorch_recipe(schedule: dict[str, Any]) -> None:
    total = 12
    hyper = {"betas": [0.9, 0.99], "weight_decay": 0.01}
    ours_model, plain_model = _tiny_model(), _tiny_model()
    ours = build_optimizer(ours_model.parameters(), "adamw", 0.01, hyper)
    ours_sched = build_scheduler(ours, schedule, total)
    plain = torch.optim.AdamW(
        plain_model.parameters(), lr=0.01, betas=(0.9, 0.99), weight_decay=0.01
    )
    plain_sched = _plain_recipe(plain, schedule, total)
    assert type(ours_sched) is type(plain_sched)
    g = torch.Generator().manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(total):
            x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
            for model, opt, sched in (
                (ours_model, ours, ours_sched),
                (plain_model, plain, plain_sched),
            ):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                assert sched is not None
                sched.step()
            assert ours.param_groups[0]["lr"] == plain.param_groups[0]["lr"]
    for a, b in zip(ours_model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_sequential_schedule_survives_a_state_dict_round_trip() -> None:
    schedule = {"name": "cosine", "warmup_steps": 3, "t_max": 6, "eta_min": 0.05}
    reference = _lrs(schedule, 10)

    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], "sgd", 1.0, {"momentum": 0.9})
    sched = build_scheduler(opt, schedule, 100)
    assert sched is not None
    for _ in range(4):
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    opt_state, sched_state = opt.state_dict(), sched.state_dict()

    q = torch.nn.Parameter(p.detach().clone())
    opt2 = build_optimizer([q], "sgd", 1.0, {"momentum": 0.9})
    sched2 = build_scheduler(opt2, schedule, 100)
    assert sched2 is not None
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    resumed = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(6):
            resumed.append(opt2.param_groups[0]["lr"])
            q.grad = torch.ones(2)
            opt2.step()
            sched2.step()
    assert resumed == pytest.approx(reference[4:], abs=1e-12)


@pytest.mark.parametrize(
    ("schedule", "field"),
    [
        ({"name": "linear"}, "schedule.name"),
        ({"name": "step"}, "schedule.step_size"),
        ({"name": "step", "step_size": 0}, "schedule.step_size"),
        ({"name": "step", "step_size": 2, "gamma": 0}, "schedule.gamma"),
        ({"name": "cosine", "t_max": 0}, "schedule.t_max"),
        ({"name": "cosine", "eta_min": -1.0}, "schedule.eta_min"),
        ({"name": "constant", "warmup_steps": -1}, "schedule.warmup_steps"),
        (
            {"name": "constant", "warmup_steps": 2, "warmup_start_factor": 0},
            "schedule.warmup_start_factor",
        ),
        ({"name": "constant", "warmup": 2}, "schedule"),
    ],
)
def test_bad_schedules_name_the_field(schedule: dict[str, Any], field: str) -> None:
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], "sgd", 1.0, {})
    with pytest.raises(SpecError) as e:
        build_scheduler(opt, schedule, 10)
    assert e.value.field == field
