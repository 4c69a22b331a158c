"""Optimizer and learning-rate schedule, built from the plain values of a job spec: on the
server in the ps modes, on every worker in allreduce mode (plain torch, no server parts).

Both are ordinary ``torch.optim`` objects built with exactly the options a user would write by
hand, so a local run in plain PyTorch can reproduce the updates bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
    StepLR,
)

from gradhub.proto.contract.errors import SpecError
from gradhub.proto.contract.spec import OPTIMIZER_HYPERPARAMETERS

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
    "adadelta": torch.optim.Adadelta,
}

# The hyperparameter keys each optimizer accepts (torch.optim keyword names): the spec owns them.
HYPERPARAMETERS = OPTIMIZER_HYPERPARAMETERS

SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine")

_SCHEDULE_KEYS = frozenset(
    {"name", "warmup_steps", "warmup_start_factor", "step_size", "gamma", "eta_min", "t_max"}
)


def parameter_groups(
    named: Sequence[tuple[str, torch.Tensor]], groups: Sequence[Mapping[str, Any]], *,
    shard_of: Sequence[str] | None = None,
) -> list[torch.Tensor] | list[dict[str, Any]]:
    """The ``params`` argument of a torch optimizer for the trainable parameters ``named``.

    Without ``groups``, the tensors in order. With them, one torch parameter group per spec
    group, in the order given, holding the parameters (in model order) whose name matches one
    of its ``params`` patterns (``fnmatch``: ``*.bias``, ``*norm*.weight``) and no earlier
    group's, with the group's hyperparameters; then one group of the remaining parameters with
    the optimizer's own. A group that matches nothing is a ``SpecError`` naming it.

    ``shard_of``: ``named`` are the pieces a parameter-server shard holds of the model whose
    parameters are ``shard_of`` (every name); the groups are the whole model's, kept even where
    the shard holds none of a group's parameters, so that a shard's optimizer state lines up
    group for group with the whole model's (``gradhub.proto.shards``).
    """
    if not groups:
        return [t for _, t in named]
    tensors = dict(named)
    return [{"params": [tensors[n] for n in names], **hyper}
            for names, hyper in group_names([n for n, _ in named], groups, shard_of=shard_of)]


def group_names(
    names: Sequence[str], groups: Sequence[Mapping[str, Any]], *, shard_of: Sequence[str] | None = None,
) -> list[tuple[list[str], dict[str, Any]]]:
    """The optimizer's parameter groups as (names in order, hyperparameters): see
    ``parameter_groups``, which builds them."""
    if not groups:
        return [(list(names), {})]
    everything = list(names if shard_of is None else shard_of)
    taken: set[str] = set()
    out: list[tuple[list[str], dict[str, Any]]] = []
    for i, group in enumerate(groups):
        patterns = group["params"]
        members = [n for n in everything if n not in taken and any(fnmatchcase(n, p) for p in patterns)]
        if not members:
            shown = ", ".join(everything[:12]) + (", ..." if len(everything) > 12 else "")
            raise SpecError(f"optimizer.param_groups[{i}].params",
                            f"no trainable parameter left matches {list(patterns)}; the model's are: {shown}")
        taken.update(members)
        hyper = {k: tuple(v) if k == "betas" else v for k, v in group.items() if k != "params"}
        mine = set(names)
        out.append(([n for n in members if n in mine], hyper))
    if any(n not in taken for n in everything):
        out.append(([n for n in names if n not in taken], {}))
    return out


def build_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    name: str,
    lr: float,
    hyper: Mapping[str, Any],
    foreach: bool | None = None,
) -> torch.optim.Optimizer:
    """Build the ``torch.optim`` optimizer ``name`` over ``params`` (tensors, or the parameter
    groups ``parameter_groups`` makes).

    The result is exactly ``OPTIMIZERS[name](params, lr=lr, **hyper)`` (with a ``betas`` list
    turned into a tuple), so ``torch.optim.Adam(model.parameters(), lr=lr, **hyper)`` in a
    user's script is the same optimizer and takes the same steps. ``foreach``: torch's option
    of that name (None: torch's choice, as a user's script gets: the single-tensor loop on
    CPU). The parameter server passes True: the multi-tensor implementation takes the same
    steps bit for bit (tests/unit/test_optim.py checks every optimizer and option) with one
    call per operation instead of one per tensor, which for a model of many small tensors is
    most of an update's time.
    """
    cls = OPTIMIZERS.get(name)
    if cls is None:
        raise SpecError(
            "optimizer.name", f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}"
        )
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr < 0:
        raise SpecError("optimizer.lr", f"must be a finite number >= 0, got {lr!r}")
    allowed = HYPERPARAMETERS[name]
    unknown = sorted(set(hyper) - allowed)
    if unknown:
        hint = " (the learning rate is optimizer.lr)" if "lr" in unknown else ""
        raise SpecError(
            "optimizer.hyper",
            f"{name} does not take {', '.join(map(repr, unknown))}{hint}; "
            f"allowed: {', '.join(sorted(allowed))}",
        )
    kwargs = dict(hyper)
    if "betas" in kwargs:
        betas = kwargs["betas"]
        if not isinstance(betas, list | tuple) or len(betas) != 2:
            raise SpecError("optimizer.hyper.betas", f"must be a pair of numbers, got {betas!r}")
        kwargs["betas"] = tuple(betas)
    if foreach is not None:
        kwargs["foreach"] = foreach
    try:
        make: Callable[..., torch.optim.Optimizer] = cls  # subclasses take lr and their hypers
        return make(params, lr=lr, **kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError("optimizer.hyper", f"{name}: {e}") from e


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float | None) -> None:
    """``torch.nn.utils.clip_grad_norm_`` over the parameters that have a gradient, as a
    single-process script calls it on the (global) gradient; nothing when ``max_norm`` is None."""
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)


def optimizer_state_copy(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with its tensors copied to the host: a snapshot that the
    next step does not change (for checkpoints)."""
    opt = optimizer.state_dict()
    return {
        "state": {k: {n: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for n, v in s.items()}
                  for k, s in opt["state"].items()},
        "param_groups": [dict(g) for g in opt["param_groups"]],
    }


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: Mapping[str, Any] | None,
    total_steps: int,
) -> LRScheduler | None:
    """Build the learning-rate schedule for ``optimizer``, or ``None`` for a constant rate.

    The caller steps it once per optimizer step, always *after* ``optimizer.step()`` (the other
    order makes torch warn and skip the schedule's first value). ``schedule`` keys: ``name``
    (``"constant"``, ``"step"`` or ``"cosine"``), ``warmup_steps`` (0), ``warmup_start_factor``
    (0.1), ``step_size`` (step only), ``gamma`` (0.1), ``eta_min`` (0.0) and ``t_max`` (``None``:
    ``max(1, total_steps - warmup_steps)``).

    To reproduce it in plain PyTorch, with ``W = warmup_steps``::

        main = StepLR(opt, step_size, gamma)            # "step"
        main = CosineAnnealingLR(opt, t_max, eta_min)   # "cosine"
        main = None                                     # "constant"
        if W > 0:
            warm = LinearLR(opt, start_factor=warmup_start_factor, end_factor=1.0, total_iters=W)
            sched = warm if main is None else SequentialLR(opt, [warm, main], milestones=[W])
        else:
            sched = main
        for step in range(total_steps):
            ...; opt.step(); sched.step()  # when sched is not None

    Create the schedulers in that order (warm-up first), right after the optimizer: each
    scheduler sets the optimizer's ``lr`` when it is created. The main schedule counts its
    steps from the end of the warm-up; a warm-up longer than the job simply never ends. torch before 2.9 prints a one-off, harmless
    "epoch parameter ... deprecated" UserWarning when a SequentialLR crosses its milestone
    (pytorch#116776); the learning rates are the same.
    """
    if schedule is None:
        return None
    unknown = sorted(set(schedule) - _SCHEDULE_KEYS)
    if unknown:
        raise SpecError(
            "schedule",
            f"unknown key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(_SCHEDULE_KEYS))}",
        )
    name = schedule.get("name", "constant")
    if name not in SCHEDULES:
        raise SpecError(
            "schedule.name", f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}"
        )
    total_steps = _int(total_steps, "total_steps", minimum=0)
    warmup = _int(schedule.get("warmup_steps", 0), "schedule.warmup_steps", minimum=0)
    start = _number(schedule.get("warmup_start_factor", 0.1), "schedule.warmup_start_factor")
    if not 0 < start <= 1:
        raise SpecError("schedule.warmup_start_factor", f"must be in (0, 1], got {start!r}")
    if name == "step":
        if schedule.get("step_size") is None:
            raise SpecError("schedule.step_size", "is required for the 'step' schedule")
        step_size = _int(schedule["step_size"], "schedule.step_size", minimum=1)
        gamma = _number(schedule.get("gamma", 0.1), "schedule.gamma")
        if gamma <= 0:
            raise SpecError("schedule.gamma", f"must be > 0, got {gamma!r}")
    elif name == "cosine":
        t_max_value = schedule.get("t_max")
        t_max = (
            max(1, total_steps - warmup)
            if t_max_value is None
            else _int(t_max_value, "schedule.t_max", minimum=1)
        )
        eta_min = _number(schedule.get("eta_min", 0.0), "schedule.eta_min")
        if eta_min < 0:
            raise SpecError("schedule.eta_min", f"must be >= 0, got {eta_min!r}")

    # Creation order matters (each scheduler sets the optimizer's lr when created): the
    # warm-up first, then the main schedule, exactly as in the recipe above.
    warm = (
        LinearLR(optimizer, start_factor=start, end_factor=1.0, total_iters=warmup)
        if warmup > 0
        else None
    )
    main: LRScheduler | None = None
    if name == "step":
        main = StepLR(optimizer, step_size=step_size, gamma=gamma)
    elif name == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=t_max, eta_min=eta_min)
    if warm is None:
        return main
    if main is None:
        return warm
    return SequentialLR(optimizer, [warm, main], milestones=[warmup])


def _int(value: Any, field: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(field, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(field, f"must be a finite number, got {value!r}")
    return float(value)
