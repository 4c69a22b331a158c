"""The job specification: what to train, how, on how many workers; validated when it is built.

A ``JobSpec`` is what a user writes as YAML or JSON and what the server stores and hands to its
workers. Every field is checked in ``__post_init__`` and errors are ``SpecError``s whose message
starts with the field's dotted path (``optimizer.lr: ...``). README.md documents each field.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gradhub.proto.contract._validate import (
    HYPER_CHECKS,
    MAX_DEPTH,
    check_bool,
    check_choice,
    check_int,
    check_keys,
    check_mapping,
    check_number,
    check_optional_int,
    check_str,
    json_value,
    prefixed,
    type_name,
)
from gradhub.proto.contract.errors import SpecError

MODES = ("ps-sync", "ps-async", "ps-ssp", "allreduce", "local-sgd")
# local-sgd's outer optimizer unless the spec names one: DiLoCo's (arXiv 2311.08105)
DEFAULT_OUTER_OPTIMIZER = {"name": "sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True}
DEFAULT_LOCAL_STEPS = 10
DEFAULT_BUCKET_MB = 25.0  # as DDP's bucket_cap_mb
COMPRESSIONS = ("none", "fp16", "bf16", "int8", "int4")
# block-quantised pushes (gradhub.proto.quant): the parameter-server modes only
QUANTISED_COMPRESSIONS = ("int8", "int4")
DEFAULT_COMPRESSION_BLOCK = 256
COMPRESSION_BLOCK_RANGE = (8, 1 << 20)
TRANSPORTS = ("auto", "grpc")
MAX_PS_SHARDS = 64
BUILTIN_MODELS = frozenset({"mlp", "cnn"})
BUILTIN_DATASETS = frozenset({"digits", "synthetic"})
BUILTIN_LOSSES = frozenset({"cross_entropy", "mse", "model"})
BUFFER_MODES = ("broadcast", "average", "local")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("constant", "step", "cosine")
OPTIMIZER_HYPERPARAMETERS: dict[str, frozenset[str]] = {
    "sgd": frozenset({"momentum", "dampening", "weight_decay", "nesterov"}),
    "adam": frozenset({"betas", "eps", "weight_decay", "amsgrad"}),
    "adamw": frozenset({"betas", "eps", "weight_decay", "amsgrad"}),
    "adagrad": frozenset({"lr_decay", "weight_decay", "initial_accumulator_value", "eps"}),
    "rmsprop": frozenset({"alpha", "eps", "weight_decay", "momentum", "centered"}),
    "adadelta": frozenset({"rho", "eps", "weight_decay"}),
}

DEFAULT_STALENESS = 2
WORKING_DIR_LIMIT = 100 << 20  # bytes of a packed working_dir; Ray's runtime_env limit as well
MAX_SPEC_BYTES = 64 << 10  # a spec's JSON (it is stored, listed and sent to every worker)
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_MAX_SEED = 2**63 - 1
_T = TypeVar("_T")
_MISSING: Any = object()  # marks a required field that was not given


# --- components -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentSpec:
    """A model, dataset or loss: a built-in ``name`` or a ``package.module:function`` factory."""

    name: str | None = None
    factory: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.name is None) == (self.factory is None):
            raise SpecError("name", "give exactly one of name (a built-in) or factory")
        if self.name is not None:
            check_str("name", self.name)
        if self.factory is not None and not (
            isinstance(self.factory, str) and _FACTORY.match(self.factory)
        ):
            raise SpecError(
                "factory", f"must look like 'package.module:function', got {self.factory!r}"
            )
        check_mapping("args", self.args)
        object.__setattr__(self, "args", json_value("args", self.args))

    def __hash__(self) -> int:
        return hash((self.name, self.factory, json.dumps(self.args, sort_keys=True)))

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ...}`` or ``{"factory": ...}``, plus ``args`` when there are any."""
        out: dict[str, Any] = {"name": self.name} if self.name else {"factory": self.factory}
        if self.args:
            out["args"] = json_value("args", self.args)  # a deep copy
        return out


def _component(value: Any, path: str, builtins: frozenset[str]) -> ComponentSpec:
    """A ComponentSpec from itself, a string (a name, or a factory if it has ':') or a mapping."""
    if value is _MISSING or value is None:
        raise SpecError(
            path,
            f"is required: a built-in name ({', '.join(sorted(builtins))}) "
            "or a factory 'package.module:function'",
        )
    if isinstance(value, str):
        value = {"factory": value} if ":" in value else {"name": value}
    if isinstance(value, Mapping):
        check_keys(path, value, ("name", "factory", "args"), "key")
        with prefixed(path):
            value = ComponentSpec(**value)
    if not isinstance(value, ComponentSpec):
        raise SpecError(
            path, f"must be a name, a factory string or a mapping, got {type_name(value)} {value!r}"
        )
    if value.name is not None:
        check_choice(f"{path}.name", value.name, builtins, f"built-in {path}")
    return value


# --- resources, optimizer, schedule ---------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What one worker reserves: CPUs and GPUs, fractions allowed (``cpus: 0.5``)."""

    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "cpus", check_number("cpus", self.cpus, lo=0))
        object.__setattr__(self, "gpus", check_number("gpus", self.gpus, lo=0))

    def to_dict(self) -> dict[str, Any]:
        """``{"cpus": ..., "gpus": ...}``."""
        return {"cpus": self.cpus, "gpus": self.gpus}


@dataclass(frozen=True)
class OptimizerSpec:
    """A torch.optim optimizer by name, its learning rate and its other keyword arguments."""

    name: str = "sgd"
    lr: float = 0.01
    hyper: Mapping[str, Any] = field(default_factory=dict)
    # [{"params": [name patterns], ...hyperparameters}]: torch parameter groups by name
    param_groups: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        check_choice("name", self.name, OPTIMIZER_HYPERPARAMETERS, "optimizer")
        object.__setattr__(self, "lr", check_number("lr", self.lr, lo=0, lo_open=True))
        check_mapping("hyper", self.hyper)
        for key in self.hyper:
            if not isinstance(key, str):
                raise SpecError("hyper", f"keys must be strings, got {key!r}")
        allowed = OPTIMIZER_HYPERPARAMETERS[self.name]
        check_keys("", self.hyper, allowed, f"hyperparameter for {self.name}")
        hyper = {key: HYPER_CHECKS[key](key, value) for key, value in self.hyper.items()}
        if hyper.get("nesterov") and (
            hyper.get("momentum", 0.0) <= 0 or hyper.get("dampening", 0.0) != 0
        ):
            raise SpecError("nesterov", "requires momentum > 0 and dampening = 0 (as torch does)")
        object.__setattr__(self, "hyper", hyper)
        object.__setattr__(self, "param_groups", self._groups(self.param_groups))

    def _groups(self, groups: Any) -> tuple[dict[str, Any], ...]:
        if not isinstance(groups, list | tuple):
            raise SpecError("param_groups", f"must be a list of groups, got {type_name(groups)}")
        allowed = {"params", "lr", *OPTIMIZER_HYPERPARAMETERS[self.name]}
        out = []
        for i, group in enumerate(groups):
            path = f"param_groups[{i}]"
            check_mapping(path, group)
            check_keys(path, group, allowed, f"key of a {self.name} parameter group")
            patterns = group.get("params")
            if isinstance(patterns, str):
                patterns = [patterns]
            if not isinstance(patterns, list | tuple) or not patterns or not all(
                    isinstance(p, str) and p for p in patterns):
                raise SpecError(f"{path}.params", "must be a non-empty list of parameter name patterns "
                                                  f"(such as '*.bias'), got {patterns!r}")
            checked: dict[str, Any] = {"params": list(patterns)}
            for key, value in group.items():
                if key == "lr":
                    checked[key] = check_number(f"{path}.lr", value, lo=0, lo_open=True)
                elif key != "params":
                    checked[key] = HYPER_CHECKS[key](f"{path}.{key}", value)
            out.append(checked)
        return tuple(out)

    def __hash__(self) -> int:
        return hash((self.name, self.lr, json.dumps(self.hyper, sort_keys=True),
                     json.dumps(self.to_dict().get("param_groups"), sort_keys=True)))

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "lr"}`` with the hyperparameters flat beside them (tuples as lists), and
        ``param_groups`` when there are any."""
        def plain(d: Mapping[str, Any]) -> dict[str, Any]:
            return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        out = {"name": self.name, "lr": self.lr, **plain(self.hyper)}
        if self.param_groups:
            out["param_groups"] = [plain(g) for g in self.param_groups]
        return out


def _optimizer(value: Any, path: str) -> OptimizerSpec:
    if isinstance(value, str):
        value = {"name": value}
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise SpecError(path, f"keys must be strings, got {key!r}")
        hyper = {k: v for k, v in value.items() if k not in ("name", "lr", "param_groups")}
        kwargs = {k: value[k] for k in ("name", "lr", "param_groups") if k in value}
        with prefixed(path):
            value = OptimizerSpec(**kwargs, hyper=hyper)
    if not isinstance(value, OptimizerSpec):
        raise SpecError(path, f"must be a name or a mapping, got {type_name(value)} {value!r}")
    return value


# which schedule each schedule-specific field belongs to, and its "not given" default
_SCHEDULE_ONLY: dict[str, tuple[str, Any]] = {
    "step_size": ("step", None),
    "gamma": ("step", 0.1),
    "eta_min": ("cosine", 0.0),
    "t_max": ("cosine", None),
}


@dataclass(frozen=True)
class ScheduleSpec:
    """A learning-rate schedule (constant, step or cosine) with an optional linear warmup."""

    name: str = "constant"
    warmup_steps: int = 0
    warmup_start_factor: float = 0.1
    step_size: int | None = None
    gamma: float = 0.1
    eta_min: float = 0.0
    t_max: int | None = None

    def __post_init__(self) -> None:
        check_choice("name", self.name, SCHEDULES, "schedule")
        for key, (owner, default) in _SCHEDULE_ONLY.items():
            if self.name != owner and getattr(self, key) != default:
                raise SpecError(key, f"only applies to schedule {owner!r}, not {self.name!r}")
        put = object.__setattr__
        put(self, "warmup_steps", check_int("warmup_steps", self.warmup_steps, lo=0))
        put(
            self,
            "warmup_start_factor",
            check_number("warmup_start_factor", self.warmup_start_factor, lo=0, hi=1, lo_open=True),
        )
        if self.name == "step" and self.step_size is None:
            raise SpecError("step_size", "is required for schedule 'step' (an integer >= 1)")
        put(self, "step_size", check_optional_int("step_size", self.step_size, lo=1))
        put(self, "gamma", check_number("gamma", self.gamma, lo=0, lo_open=True))
        put(self, "eta_min", check_number("eta_min", self.eta_min, lo=0))
        put(self, "t_max", check_optional_int("t_max", self.t_max, lo=1))

    def to_dict(self) -> dict[str, Any]:
        """The name, the warmup and the fields that apply to this schedule (None left out)."""
        out: dict[str, Any] = {
            "name": self.name,
            "warmup_steps": self.warmup_steps,
            "warmup_start_factor": self.warmup_start_factor,
        }
        for key, (owner, _) in _SCHEDULE_ONLY.items():
            if owner == self.name and getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _nested(cls: type[_T], value: Any, path: str, named: bool = True) -> _T:
    """A ``cls`` from itself, a mapping of its fields or (when ``named``) its name alone."""
    if named and isinstance(value, str):
        value = {"name": value}
    if isinstance(value, Mapping):
        check_keys(path, value, [f.name for f in fields(cls)], "key")  # type: ignore[arg-type]
        with prefixed(path):
            value = cls(**value)
    if not isinstance(value, cls):
        form = "a name or a mapping" if named else "a mapping"
        raise SpecError(path, f"must be {form}, got {type_name(value)} {value!r}")
    return value


# --- the job --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One training job. ``model`` and ``dataset`` are required; README.md explains every field.

    Nested fields may be given as specs, mappings or (model, dataset, loss, optimizer,
    lr_schedule) plain names. After construction ``staleness`` is 2 for ``ps-ssp`` when it was
    not given, and ``epochs`` is 1 when neither ``epochs`` nor ``steps`` was given.
    """

    name: str = "job"
    mode: str = "ps-sync"
    staleness: int | None = None
    # a fixed size, or ``{min: A, max: B}`` (a mapping): an elastic job; an int after
    # construction (see ``min_workers``)
    workers: int = 2
    resources: Resources = field(default_factory=Resources)
    model: ComponentSpec = _MISSING
    dataset: ComponentSpec = _MISSING
    loss: ComponentSpec = field(default_factory=lambda: ComponentSpec(name="cross_entropy"))
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    lr_schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    compression: str = "none"
    transport: str = "auto"
    # ps modes: the parameter server's shards, each holding a contiguous slice of the flat
    # parameters and its optimizer state (1 to 64, or "auto": one per Ray node with CPUs)
    ps_shards: int | str = 1
    batch_size: int = 32
    epochs: int | None = None
    steps: int | None = None
    seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    working_dir: str | None = None
    max_restarts: int = 3
    spares: int = 0
    val_fraction: float = 0.2
    buffers: str = "broadcast"
    sync_batchnorm: bool = False
    find_unused_parameters: bool | None = None
    precision: str = "fp32"
    accumulate: int = 1
    # ps modes: gradient buckets of at most this many MB, pushed while backward runs; 0 pushes
    # the whole gradient after backward (the default for CPU workers; 25 for GPU workers)
    bucket_mb: float | None = None
    clip_grad_norm: float | None = None
    metrics: ComponentSpec | None = None
    # local-sgd: inner steps per round, the server's outer optimizer, and whether a round
    # waits for every worker (sync) or applies each worker's change on arrival (async)
    local_steps: int | None = None
    outer_optimizer: OptimizerSpec | None = None
    outer_sync: bool | None = None
    # local-sgd with outer_sync false: a pseudo-gradient computed ``s`` outer steps ago is
    # applied scaled by 1 / (1 + s) (Async Local-SGD, arXiv 2401.09135)
    staleness_scaling: bool | None = None
    # local-sgd streaming (Streaming DiLoCo, arXiv 2501.18512): the model syncs in ``fragments``
    # runs of whole tensors at staggered steps; a fragment's new global values arrive
    # ``fragment_overlap`` inner steps after its push (training goes on meanwhile) and are
    # merged as ``fragment_mix * local + (1 - fragment_mix) * global``
    fragments: int | None = None
    fragment_overlap: int | None = None
    fragment_mix: float | None = None
    # compression int8 / int4: values per scale, and whether a worker adds what quantisation
    # left out of its last push to its next one
    compression_block: int | None = None
    error_feedback: bool | None = None
    # after construction ``workers`` is the largest size (B), which the global batch and the
    # steps are counted on, and ``min_workers`` the smallest (A; ``workers`` for a fixed size)
    min_workers: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        put = object.__setattr__
        if not (isinstance(self.name, str) and _JOB_NAME.match(self.name)):
            raise SpecError(
                "name", f"must be 1 to 64 of the characters A-Z a-z 0-9 . _ -, got {self.name!r}"
            )
        check_choice("mode", self.mode, MODES, "mode")
        if self.mode == "ps-ssp":
            staleness = DEFAULT_STALENESS if self.staleness is None else self.staleness
            put(self, "staleness", check_int("staleness", staleness, lo=0))
        elif self.staleness is not None:
            raise SpecError("staleness", f"only applies to mode ps-ssp, not {self.mode!r}")
        self._check_workers()
        put(self, "resources", _nested(Resources, self.resources, "resources", named=False))
        put(self, "model", _component(self.model, "model", BUILTIN_MODELS))
        put(self, "dataset", _component(self.dataset, "dataset", BUILTIN_DATASETS))
        put(self, "loss", _component(self.loss, "loss", BUILTIN_LOSSES))
        put(self, "optimizer", _optimizer(self.optimizer, "optimizer"))
        put(self, "lr_schedule", _nested(ScheduleSpec, self.lr_schedule, "lr_schedule"))
        if self.lr_schedule.eta_min > self.optimizer.lr:
            raise SpecError(
                "lr_schedule.eta_min",
                f"must not exceed optimizer.lr ({self.lr_schedule.eta_min} > {self.optimizer.lr})",
            )
        check_choice("compression", self.compression, COMPRESSIONS, "compression")
        check_choice("transport", self.transport, TRANSPORTS, "transport")
        put(self, "batch_size", check_int("batch_size", self.batch_size, lo=1))
        if self.epochs is not None and self.steps is not None:
            raise SpecError("steps", "give either epochs or steps, not both")
        if self.steps is None:
            put(
                self, "epochs", check_int("epochs", 1 if self.epochs is None else self.epochs, lo=1)
            )
        else:
            put(self, "steps", check_int("steps", self.steps, lo=1))
        put(self, "seed", check_int("seed", self.seed, lo=0, hi=_MAX_SEED))
        put(self, "eval_every", check_int("eval_every", self.eval_every, lo=0))
        put(self, "checkpoint_every", check_int("checkpoint_every", self.checkpoint_every, lo=0))
        put(self, "keep_checkpoints", check_int("keep_checkpoints", self.keep_checkpoints, lo=1))
        if self.working_dir is not None:
            wd = self.working_dir
            wd = os.fspath(wd) if isinstance(wd, os.PathLike) else wd
            put(self, "working_dir", check_str("working_dir", wd))
        put(self, "max_restarts", check_int("max_restarts", self.max_restarts, lo=0))
        put(self, "spares", check_int("spares", self.spares, lo=0, hi=self.workers))
        if self.spares and self.elastic:
            raise SpecError("spares", "an elastic job shrinks when it loses a worker and grows back; "
                                      "give spares: 0 (spares keep a job of fixed size whole)")
        put(
            self,
            "val_fraction",
            check_number("val_fraction", self.val_fraction, lo=0, hi=1, hi_open=True),
        )
        self._check_training_options()
        self._check_local_sgd()
        self._check_compression()
        self._check_shards()

    def _check_shards(self) -> None:
        """``ps_shards``: a count or ``auto``, and what a sharded parameter server does not do yet."""
        shards = self.ps_shards
        if shards == "auto":
            pass
        elif isinstance(shards, str):
            raise SpecError("ps_shards", f"must be a number of shards (1 to {MAX_PS_SHARDS}) or 'auto', "
                                         f"got {shards!r}")
        else:
            object.__setattr__(self, "ps_shards", check_int("ps_shards", shards, lo=1, hi=MAX_PS_SHARDS))
        if self.ps_shards == 1:
            return
        refused = {
            "mode": self.mode not in ("ps-sync", "ps-async", "ps-ssp") and f"mode {self.mode!r} (the ps-* modes shard)",
            "transport": self.transport == "grpc" and "transport: grpc (shards serve the data plane only)",
        }
        for name, why in refused.items():
            if why:
                raise SpecError(name, f"ps_shards: {self.ps_shards} does not take {why}; give ps_shards: 1")

    def _check_workers(self) -> None:
        """``workers: N``, or ``workers: {min: A, max: B}`` for an elastic job."""
        put = object.__setattr__
        workers: Any = self.workers
        if isinstance(workers, Mapping):
            check_keys("workers", workers, ("min", "max"), "key")
            if "max" not in workers:
                raise SpecError("workers.max", "is required with workers.min (the largest size)")
            most = check_int("workers.max", workers["max"], lo=1, hi=1024)
            least = check_int("workers.min", workers.get("min", 1), lo=1, hi=most)
            if self.mode == "local-sgd" and least < most:
                raise SpecError("workers", "local-sgd jobs have a fixed size; give workers: N")
            put(self, "workers", most)
            put(self, "min_workers", least)
            return
        put(self, "workers", check_int("workers", workers, lo=1, hi=1024))
        put(self, "min_workers", self.workers)

    def _check_local_sgd(self) -> None:
        """local-sgd's own fields: defaults when it is the mode, errors when it is not."""
        put = object.__setattr__
        if self.mode != "local-sgd":
            for name in ("local_steps", "outer_optimizer", "outer_sync", "staleness_scaling", "fragments",
                         "fragment_overlap", "fragment_mix"):
                if getattr(self, name) is not None:
                    raise SpecError(name, f"only applies to mode local-sgd, not {self.mode!r}")
            return
        steps = DEFAULT_LOCAL_STEPS if self.local_steps is None else self.local_steps
        local_steps = check_int("local_steps", steps, lo=1, hi=1_000_000)
        put(self, "local_steps", local_steps)
        outer = DEFAULT_OUTER_OPTIMIZER if self.outer_optimizer is None else self.outer_optimizer
        put(self, "outer_optimizer", _optimizer(outer, "outer_optimizer"))
        if self.outer_optimizer is not None and self.outer_optimizer.param_groups:
            raise SpecError("outer_optimizer.param_groups", "the outer optimizer takes no parameter groups")
        put(self, "outer_sync", check_bool("outer_sync", True if self.outer_sync is None else self.outer_sync))
        if self.buffers == "average" and not self.outer_sync:
            raise SpecError("buffers", "'average' needs outer_sync: true; use 'broadcast' or 'local'")
        if self.staleness_scaling is not None:
            put(self, "staleness_scaling", check_bool("staleness_scaling", self.staleness_scaling))
            if self.staleness_scaling and self.outer_sync:
                raise SpecError("staleness_scaling", "applies with outer_sync: false (a synchronous round has "
                                                     "no staleness)")
        fragments = check_int("fragments", 1 if self.fragments is None else self.fragments, lo=1,
                              hi=local_steps)
        put(self, "fragments", fragments)
        gap = local_steps // fragments  # inner steps between two fragments' syncs
        put(self, "fragment_overlap", check_int("fragment_overlap", self.fragment_overlap or 0, lo=0, hi=gap))
        put(self, "fragment_mix", check_number("fragment_mix", self.fragment_mix or 0.0, lo=0, hi=1, hi_open=True))

    def _check_compression(self) -> None:
        """int8 / int4 quantise the pushes to the parameter server; their block and error feedback."""
        put = object.__setattr__
        if self.compression not in QUANTISED_COMPRESSIONS:
            for name in ("compression_block", "error_feedback"):
                if getattr(self, name) is not None:
                    raise SpecError(name, f"only applies to compression int8 or int4, not {self.compression!r}")
            return
        if not self.is_ps:
            raise SpecError("compression", f"{self.compression} quantises what workers push to the parameter "
                                           f"server (ps-* and local-sgd); mode {self.mode!r} takes none, fp16 "
                                           "or bf16")
        lo, hi = COMPRESSION_BLOCK_RANGE
        block = DEFAULT_COMPRESSION_BLOCK if self.compression_block is None else self.compression_block
        put(self, "compression_block", check_int("compression_block", block, lo=lo, hi=hi))
        feedback = False if self.error_feedback is None else self.error_feedback
        put(self, "error_feedback", check_bool("error_feedback", feedback))

    def _check_training_options(self) -> None:
        """The options that make any PyTorch model train as it would in plain PyTorch."""
        put = object.__setattr__
        check_choice("buffers", self.buffers, BUFFER_MODES, "buffer mode")
        if self.buffers == "average" and self.mode in ("ps-async", "ps-ssp"):
            raise SpecError("buffers", f"'average' needs a synchronous mode (ps-sync or allreduce), "
                                       f"not {self.mode!r}; use 'broadcast' or 'local'")
        put(self, "sync_batchnorm", check_bool("sync_batchnorm", self.sync_batchnorm))
        if self.sync_batchnorm:
            if self.mode != "allreduce":
                raise SpecError("sync_batchnorm", f"only applies to mode allreduce, not {self.mode!r}")
            if self.resources.gpus <= 0:
                raise SpecError("sync_batchnorm", "torch's SyncBatchNorm runs on GPU workers only; "
                                                  "set resources.gpus > 0 or use buffers: average")
        if self.find_unused_parameters is not None:
            check_bool("find_unused_parameters", self.find_unused_parameters)
            if self.mode != "allreduce":
                raise SpecError("find_unused_parameters", "only applies to mode allreduce (the ps modes "
                                                          f"always skip unused parameters), not {self.mode!r}")
        check_choice("precision", self.precision, PRECISIONS, "precision")
        put(self, "accumulate", check_int("accumulate", self.accumulate, lo=1))
        if self.bucket_mb is not None:
            if self.mode not in ("ps-sync", "ps-async", "ps-ssp"):
                raise SpecError("bucket_mb", f"only applies to the ps modes, not {self.mode!r}")
            put(self, "bucket_mb", check_number("bucket_mb", self.bucket_mb, lo=0, hi=1024))
        if self.elastic and self.accumulate > 1:
            raise SpecError("accumulate", "an elastic job (workers: {min, max}) cuts its global batch into "
                                          "slices of unequal length; it takes accumulate: 1")
        if self.batch_size % self.accumulate:
            raise SpecError("accumulate", f"must divide batch_size ({self.batch_size}) into equal "
                                          f"micro-batches, got {self.accumulate}")
        if self.clip_grad_norm is not None:
            put(self, "clip_grad_norm", check_number("clip_grad_norm", self.clip_grad_norm, lo=0, lo_open=True))
        if self.metrics is not None:
            metrics = self.metrics
            if isinstance(metrics, str) and ":" not in metrics or isinstance(metrics, ComponentSpec) and metrics.name:
                raise SpecError("metrics", "must be a factory 'package.module:function' returning "
                                           "fn(output, target) -> {name: value}; val_loss and val_accuracy "
                                           "are always reported")
            put(self, "metrics", _component(metrics, "metrics", frozenset()))
    # --- derived values ---

    @property
    def elastic(self) -> bool:
        """Whether the job's size may change while it runs (``workers: {min, max}``)."""
        return self.min_workers < self.workers

    @property
    def is_ps(self) -> bool:
        """True for the modes the parameter server serves (``ps-*``, and ``local-sgd``, whose
        outer step it takes)."""
        return self.mode.startswith("ps-") or self.mode == "local-sgd"

    @property
    def worker_steps_optimizer(self) -> bool:
        """True where each worker steps the job's optimizer itself (allreduce, and local-sgd's
        inner steps); in the ``ps-*`` modes the parameter server steps it."""
        return not self.mode.startswith("ps-")

    @property
    def store_mode(self) -> str:
        """How the parameter store applies what workers push: the ps mode itself, or for
        local-sgd a round as ps-sync (``outer_sync``) or ps-async applies a step."""
        if self.mode == "local-sgd":
            return "ps-sync" if self.outer_sync else "ps-async"
        return self.mode

    def rounds(self, total_steps: int) -> int:
        """local-sgd: the rounds of ``local_steps`` inner steps that ``total_steps`` make (the
        last one may be shorter); other modes: ``total_steps``."""
        if self.mode != "local-sgd":
            return total_steps
        assert self.local_steps is not None
        return -(-total_steps // self.local_steps)

    def syncs(self, total_steps: int) -> int:
        """local-sgd: the parameter server's steps in a job of ``total_steps`` inner steps, one
        per fragment per round; other modes: ``total_steps``."""
        return self.rounds(total_steps) * (self.fragments or 1)

    @property
    def effective_bucket_mb(self) -> float:
        """ps modes: ``bucket_mb``, else 25 MB for GPU workers (they push while the GPU computes
        backward) and 0 for CPU workers (their pushes would take the cores backward runs on:
        README, bench_ps.py (g))."""
        if self.bucket_mb is not None:
            return self.bucket_mb
        return DEFAULT_BUCKET_MB if self.resources.gpus > 0 else 0.0

    @property
    def applies_buckets(self) -> bool:
        """ps modes: whether the server applies each bucket of a pushed gradient as soon as it
        can (ps-sync: once every worker's copy is in; async: on arrival). Not with
        ``clip_grad_norm`` (its norm spans the whole gradient) nor for an elastic job (a step in
        flight may have to be done again at another size)."""
        return not self.elastic and self.clip_grad_norm is None

    @property
    def effective_staleness(self) -> int:
        """How many steps a worker may run ahead: ``staleness`` for ``ps-ssp``, else 0."""
        return self.staleness if self.mode == "ps-ssp" and self.staleness is not None else 0

    def total_steps(self, train_size: int) -> int:
        """``steps``, or ``epochs`` times the steps per epoch for a training set of this size."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None  # __post_init__ sets one of the two
        global_batch = self.workers * self.batch_size
        per_epoch = train_size // global_batch
        if per_epoch == 0:
            raise SpecError(
                "batch_size",
                f"the global batch of {self.workers} x {self.batch_size} = {global_batch} is "
                f"larger than the training set of {train_size} samples; lower batch_size or workers",
            )
        return self.epochs * per_epoch

    # --- conversion ---

    def to_dict(self) -> dict[str, Any]:
        """The canonical dict/YAML form: plain dicts and lists, fields that are None left out."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and f.init:
                out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        if self.elastic:
            out["workers"] = {"min": self.min_workers, "max": self.workers}
        return out

    def to_json(self) -> str:
        """``to_dict()`` as JSON with sorted keys."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Build from the dict form; unknown keys are errors with a did-you-mean hint."""
        if not isinstance(data, Mapping):
            raise SpecError("spec", f"must be a mapping of fields, got {type_name(data)}")
        check_keys("", data, [f.name for f in fields(cls) if f.init], "field")
        return cls(**data)

    def replace(self, **changes: Any) -> JobSpec:
        """This spec with ``changes`` (field names to values), validated again. Use this, not
        ``dataclasses.replace``, which would make an elastic job's ``workers`` a fixed size."""
        return JobSpec.from_dict({**self.to_dict(), **changes})

    @classmethod
    def coerce(cls, spec: JobSpec | Mapping[str, Any]) -> JobSpec:
        """Return ``spec`` itself if it is a JobSpec, else ``from_dict(spec)``."""
        return spec if isinstance(spec, JobSpec) else cls.from_dict(spec)

    @classmethod
    def from_json(cls, text: str | bytes) -> JobSpec:
        """Parse JSON text whose top level is an object, of at most ``MAX_SPEC_BYTES``."""
        if len(text) > MAX_SPEC_BYTES:
            raise SpecError("json", f"the spec is {len(text)} bytes; the limit is {MAX_SPEC_BYTES} "
                                    "(ship data in the working_dir or a dataset factory, not in args)")
        try:
            data = json.loads(text)
        except ValueError as e:
            raise SpecError("json", f"invalid JSON: {e}") from e
        except RecursionError:
            raise SpecError("json", f"nested too deeply (the limit is {MAX_DEPTH + 2} levels)") from None
        if not isinstance(data, Mapping):
            raise SpecError("json", f"top level must be an object, got {type_name(data)}")
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> JobSpec:
        """Read a YAML file (a Path, or a str naming an existing file) or parse YAML text."""
        source = path_or_text
        if isinstance(source, Path) or (isinstance(source, str) and os.path.isfile(source)):
            try:
                source = Path(source).read_text(encoding="utf-8")
            except OSError as e:
                raise SpecError("yaml", f"cannot read {str(path_or_text)!r}: {e}") from e
        if not isinstance(source, str):
            raise SpecError("yaml", f"expected a path or YAML text, got {type_name(source)}")
        try:
            data = yaml.load(source, Loader=_YamlLoader)  # a SafeLoader subclass
        except yaml.YAMLError as e:
            raise SpecError("yaml", f"invalid YAML: {e}") from e
        if not isinstance(data, Mapping):
            if "\n" not in source and source.strip().endswith((".yaml", ".yml")):
                raise SpecError("yaml", f"no such file: {source.strip()!r}")
            got = "an empty document" if data is None else type_name(data)
            raise SpecError("yaml", f"top level must be a mapping, got {got}")
        return cls.from_dict(data)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 would make it a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
