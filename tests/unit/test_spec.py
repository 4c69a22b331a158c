"""Unit tests for gradhub.proto.contract.spec: round trips, defaults, and a failing case for every field."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradhub.proto.contract.errors import SpecError
from gradhub.proto.contract.spec import (
    BUILTIN_DATASETS,
    BUILTIN_LOSSES,
    BUILTIN_MODELS,
    COMPRESSIONS,
    MODES,
    OPTIMIZER_HYPERPARAMETERS,
    SCHEDULES,
    ComponentSpec,
    JobSpec,
    OptimizerSpec,
    Resources,
    ScheduleSpec,
)

EXAMPLE_YAML = """\
name: digits-mlp
mode: ps-sync
workers: 2
resources: {cpus: 0.5, gpus: 0}
model: {name: mlp, args: {hidden: [128]}}
dataset: {name: digits}
loss: cross_entropy
optimizer: {name: adam, lr: 0.001, betas: [0.9, 0.999]}
lr_schedule: {name: cosine, warmup_steps: 10}
batch_size: 32
epochs: 20
seed: 0
"""

BASE: dict[str, Any] = {"model": "mlp", "dataset": "digits"}


def build(**overrides: Any) -> JobSpec:
    return JobSpec.from_dict({**BASE, **overrides})


def full_spec() -> JobSpec:
    """A spec where every field differs from its default."""
    return JobSpec.from_dict(
        {
            "name": "full_spec.v2",
            "mode": "ps-ssp",
            "staleness": 5,
            "workers": 8,
            "resources": {"cpus": 2, "gpus": 0.25},
            "model": {"factory": "my_pkg.models:build", "args": {"width": 3, "acts": ("relu",)}},
            "dataset": {"name": "synthetic", "args": {"n": 100, "noise": 0.5, "x": None}},
            "loss": "my_pkg.losses:focal",
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
            "lr_schedule": {"name": "step", "step_size": 10, "gamma": 0.5, "warmup_steps": 3},
            "compression": "bf16",
            "transport": "grpc",
            "batch_size": 7,
            "steps": 1000,
            "seed": 2**63 - 1,
            "eval_every": 50,
            "checkpoint_every": 100,
            "keep_checkpoints": 1,
            "working_dir": "/tmp/gradhub-job",
            "max_restarts": 0,
            "val_fraction": 0.0,
        }
    )


# --- round trips and defaults ---------------------------------------------------------------


def test_example_yaml_parses_and_to_dict_is_the_canonical_form() -> None:
    spec = JobSpec.from_yaml(EXAMPLE_YAML)
    assert spec.resources == Resources(cpus=0.5, gpus=0.0)
    assert spec.model == ComponentSpec(name="mlp", args={"hidden": [128]})
    assert spec.loss == ComponentSpec(name="cross_entropy")
    assert spec.optimizer == OptimizerSpec("adam", 0.001, {"betas": (0.9, 0.999)})
    assert spec.lr_schedule == ScheduleSpec(name="cosine", warmup_steps=10)
    assert spec.to_dict() == {
        "name": "digits-mlp",
        "mode": "ps-sync",
        "workers": 2,
        "resources": {"cpus": 0.5, "gpus": 0.0},
        "model": {"name": "mlp", "args": {"hidden": [128]}},
        "dataset": {"name": "digits"},
        "loss": {"name": "cross_entropy"},
        "optimizer": {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999]},
        "lr_schedule": {
            "name": "cosine",
            "warmup_steps": 10,
            "warmup_start_factor": 0.1,
            "eta_min": 0.0,
        },
        "compression": "none",
        "transport": "auto",
        "ps_shards": 1,
        "batch_size": 32,
        "epochs": 20,
        "seed": 0,
        "eval_every": 0,
        "checkpoint_every": 0,
        "keep_checkpoints": 3,
        "max_restarts": 3,
        "spares": 0,
        "val_fraction": 0.2,
        "buffers": "broadcast",
        "sync_batchnorm": False,
        "precision": "fp32",
        "accumulate": 1,
    }


@pytest.mark.parametrize(
    "make", [lambda: build(), full_spec, lambda: JobSpec.from_yaml(EXAMPLE_YAML)]
)
def test_round_trips(make: Any, tmp_path: Path) -> None:
    spec = make()
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert JobSpec.from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json()) == spec.to_dict()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    assert JobSpec.from_yaml(path) == spec
    assert JobSpec.from_yaml(str(path)) == spec
    assert JobSpec.from_yaml(path.read_text()) == spec
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert hash(JobSpec.from_dict(spec.to_dict())) == hash(spec)


def test_to_dict_is_plain_data_and_a_copy() -> None:
    spec = full_spec()
    data = spec.to_dict()
    assert data["model"]["args"] == {"width": 3, "acts": ["relu"]}
    assert "epochs" not in data and data["steps"] == 1000
    data["model"]["args"]["width"] = 99
    assert spec.model.args["width"] == 3
    yaml.safe_dump(data)  # only plain types


def test_defaults() -> None:
    spec = JobSpec(model=ComponentSpec(name="mlp"), dataset=ComponentSpec(name="digits"))
    assert spec == build()
    assert (spec.name, spec.mode, spec.staleness, spec.workers) == ("job", "ps-sync", None, 2)
    assert spec.resources == Resources(cpus=1.0, gpus=0.0)
    assert spec.loss == ComponentSpec(name="cross_entropy")
    assert spec.optimizer == OptimizerSpec(name="sgd", lr=0.01, hyper={})
    assert spec.lr_schedule == ScheduleSpec(name="constant")
    assert (spec.compression, spec.batch_size, spec.epochs, spec.steps) == ("none", 32, 1, None)
    assert (spec.seed, spec.eval_every, spec.checkpoint_every) == (0, 0, 0)
    assert (spec.keep_checkpoints, spec.working_dir, spec.max_restarts) == (3, None, 3)
    assert spec.val_fraction == 0.2
    assert spec.is_ps and spec.effective_staleness == 0


def test_constants() -> None:
    assert set(MODES) == {"ps-sync", "ps-async", "ps-ssp", "allreduce", "local-sgd"}
    assert set(COMPRESSIONS) == {"none", "fp16", "bf16", "int8", "int4"}
    assert BUILTIN_MODELS == {"mlp", "cnn"} and BUILTIN_DATASETS == {"digits", "synthetic"}
    assert BUILTIN_LOSSES == {"cross_entropy", "mse", "model"}
    assert set(SCHEDULES) == {"constant", "step", "cosine"}


def test_nested_fields_accept_mappings_and_names() -> None:
    spec = JobSpec(
        model={"name": "cnn"},  # type: ignore[arg-type]
        dataset="pkg.data:load",  # type: ignore[arg-type]
        loss="mse",  # type: ignore[arg-type]
        resources={"gpus": 1},  # type: ignore[arg-type]
        optimizer="adam",  # type: ignore[arg-type]
        lr_schedule="cosine",  # type: ignore[arg-type]
    )
    assert spec.model == ComponentSpec(name="cnn")
    assert spec.dataset == ComponentSpec(factory="pkg.data:load")
    assert spec.loss == ComponentSpec(name="mse")
    assert spec.resources == Resources(cpus=1.0, gpus=1.0)
    assert spec.optimizer == OptimizerSpec(name="adam")
    assert spec.lr_schedule == ScheduleSpec(name="cosine")


def test_ints_accepted_where_floats_expected() -> None:
    spec = build(resources={"cpus": 2, "gpus": 1}, optimizer={"name": "adam", "lr": 1, "eps": 0})
    assert isinstance(spec.resources.cpus, float) and spec.resources.cpus == 2.0
    assert isinstance(spec.optimizer.lr, float) and spec.optimizer.hyper["eps"] == 0.0


def test_args_are_copied_from_the_caller() -> None:
    args = {"hidden": [64]}
    comp = ComponentSpec(name="mlp", args=args)
    args["hidden"].append(32)
    assert comp.args == {"hidden": [64]}


def test_coerce() -> None:
    spec = build()
    assert JobSpec.coerce(spec) is spec
    assert JobSpec.coerce(dict(BASE)) == spec
    with pytest.raises(SpecError, match=r"^spec: must be a mapping"):
        JobSpec.coerce([1, 2])  # type: ignore[arg-type]


# --- one failing case (or more) for every field ---------------------------------------------

INVALID: list[tuple[str, dict[str, Any]]] = [
    ("name", {"name": ""}),
    ("name", {"name": "a" * 65}),
    ("name", {"name": "has space"}),
    ("name", {"name": 7}),
    ("mode", {"mode": "ps_sync"}),
    ("mode", {"mode": None}),
    ("staleness", {"staleness": 1}),
    ("staleness", {"mode": "ps-ssp", "staleness": -1}),
    ("staleness", {"mode": "ps-ssp", "staleness": True}),
    ("workers", {"workers": 0}),
    ("workers", {"workers": 1025}),
    ("workers", {"workers": True}),
    ("workers", {"workers": "2"}),
    ("workers", {"workers": 2.0}),
    ("workers.max", {"workers": {"min": 2}}),
    ("workers.max", {"workers": {"min": 1, "max": 1025}}),
    ("workers.min", {"workers": {"min": 3, "max": 2}}),
    ("workers.min", {"workers": {"min": 0, "max": 2}}),
    ("workers.most", {"workers": {"min": 1, "most": 2}}),
    ("workers", {"mode": "local-sgd", "workers": {"min": 1, "max": 2}}),
    ("spares", {"workers": {"min": 1, "max": 2}, "spares": 1}),
    ("accumulate", {"workers": {"min": 1, "max": 2}, "accumulate": 2, "batch_size": 32}),
    ("resources", {"resources": 4}),
    ("resources.cpus", {"resources": {"cpus": -0.5}}),
    ("resources.cpus", {"resources": {"cpus": "1"}}),
    ("resources.gpus", {"resources": {"gpus": math.inf}}),
    ("resources.gpus", {"resources": {"gpus": True}}),
    ("model", {"model": None}),
    ("model", {"model": 3}),
    ("model.name", {"model": "mpl"}),
    ("model.name", {"model": {"name": "mlp", "factory": "a:b"}}),
    ("model.name", {"model": {"args": {}}}),
    ("model.factory", {"model": "pkg.mod:"}),
    ("model.factory", {"model": {"factory": "pkg.mod.fn"}}),
    ("model.args", {"model": {"name": "mlp", "args": [1]}}),
    ("model.args.hidden", {"model": {"name": "mlp", "args": {"hidden": {1, 2}}}}),
    ("model.args.x[0]", {"model": {"name": "mlp", "args": {"x": [math.nan]}}}),
    ("dataset", {"dataset": None}),
    ("dataset.name", {"dataset": "mnist"}),
    ("dataset.factory", {"dataset": "1pkg:load"}),
    ("loss", {"loss": ["mse"]}),
    ("loss.name", {"loss": "nll"}),
    ("loss.factory", {"loss": {"factory": ":fn"}}),
    ("optimizer", {"optimizer": 0.1}),
    ("optimizer.name", {"optimizer": "adamm"}),
    ("optimizer.lr", {"optimizer": {"lr": 0}}),
    ("optimizer.lr", {"optimizer": {"lr": -0.1}}),
    ("optimizer.lr", {"optimizer": {"lr": math.nan}}),
    ("optimizer.lr", {"optimizer": {"lr": "0.1"}}),
    ("optimizer.lr", {"optimizer": {"lr": True}}),
    ("optimizer.momentum", {"optimizer": {"momentum": -1}}),
    ("lr_schedule", {"lr_schedule": 3}),
    ("lr_schedule.name", {"lr_schedule": "linear"}),
    ("lr_schedule.warmup_steps", {"lr_schedule": {"warmup_steps": -1}}),
    ("lr_schedule.warmup_steps", {"lr_schedule": {"warmup_steps": 1.5}}),
    ("lr_schedule.warmup_start_factor", {"lr_schedule": {"warmup_start_factor": 0}}),
    ("lr_schedule.warmup_start_factor", {"lr_schedule": {"warmup_start_factor": 1.5}}),
    ("lr_schedule.step_size", {"lr_schedule": "step"}),
    ("lr_schedule.step_size", {"lr_schedule": {"name": "step", "step_size": 0}}),
    ("lr_schedule.step_size", {"lr_schedule": {"name": "cosine", "step_size": 5}}),
    ("lr_schedule.gamma", {"lr_schedule": {"name": "step", "step_size": 1, "gamma": 0}}),
    ("lr_schedule.gamma", {"lr_schedule": {"name": "constant", "gamma": 0.5}}),
    ("lr_schedule.eta_min", {"lr_schedule": {"name": "cosine", "eta_min": -1e-3}}),
    ("lr_schedule.eta_min", {"lr_schedule": {"name": "cosine", "eta_min": 1.0}}),  # above lr
    ("lr_schedule.eta_min", {"lr_schedule": {"name": "step", "step_size": 2, "eta_min": 0.1}}),
    ("lr_schedule.t_max", {"lr_schedule": {"name": "cosine", "t_max": 0}}),
    ("lr_schedule.t_max", {"lr_schedule": {"name": "constant", "t_max": 10}}),
    ("compression", {"compression": "int2"}),
    ("compression", {"compression": "int8", "mode": "allreduce"}),
    ("compression_block", {"compression": "int8", "compression_block": 4}),
    ("compression_block", {"compression_block": 256}),
    ("error_feedback", {"compression": "int4", "error_feedback": 1}),
    ("error_feedback", {"error_feedback": True}),
    ("transport", {"transport": "rdma"}),
    ("ps_shards", {"ps_shards": 0}),
    ("ps_shards", {"ps_shards": 65}),
    ("ps_shards", {"ps_shards": "many"}),
    ("mode", {"ps_shards": 2, "mode": "allreduce"}),
    ("transport", {"ps_shards": 2, "transport": "grpc"}),
    ("batch_size", {"batch_size": 0}),
    ("batch_size", {"batch_size": "32"}),
    ("epochs", {"epochs": 0}),
    ("epochs", {"epochs": True}),
    ("steps", {"steps": 0}),
    ("steps", {"epochs": 2, "steps": 10}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": 2**63}),
    ("seed", {"seed": False}),
    ("eval_every", {"eval_every": -1}),
    ("checkpoint_every", {"checkpoint_every": -5}),
    ("keep_checkpoints", {"keep_checkpoints": 0}),
    ("working_dir", {"working_dir": ""}),
    ("working_dir", {"working_dir": 5}),
    ("max_restarts", {"max_restarts": -1}),
    ("max_restarts", {"max_restarts": 1.0}),
    ("spares", {"spares": -1}),
    ("spares", {"workers": 2, "spares": 3}),
    ("val_fraction", {"val_fraction": 1.0}),
    ("val_fraction", {"val_fraction": -0.1}),
    ("val_fraction", {"val_fraction": "0.2"}),
    ("buffers", {"buffers": "sync"}),
    ("buffers", {"mode": "ps-async", "buffers": "average"}),
    ("sync_batchnorm", {"sync_batchnorm": 1}),
    ("sync_batchnorm", {"sync_batchnorm": True}),
    ("sync_batchnorm", {"mode": "allreduce", "sync_batchnorm": True}),
    ("find_unused_parameters", {"find_unused_parameters": "yes"}),
    ("find_unused_parameters", {"find_unused_parameters": True}),
    ("precision", {"precision": "fp8"}),
    ("accumulate", {"accumulate": 0}),
    ("accumulate", {"batch_size": 32, "accumulate": 3}),
    ("clip_grad_norm", {"clip_grad_norm": 0}),
    ("clip_grad_norm", {"clip_grad_norm": "1"}),
    ("metrics", {"metrics": "accuracy"}),
    ("metrics.factory", {"metrics": {"factory": "not a factory"}}),
    ("optimizer.param_groups", {"optimizer": {"name": "sgd", "param_groups": {"params": ["*"]}}}),
    ("optimizer.param_groups[0].params", {"optimizer": {"name": "sgd", "param_groups": [{"params": []}]}}),
    ("optimizer.param_groups[0].betas", {"optimizer": {"name": "sgd", "param_groups": [{"params": ["*"], "betas": [0.9, 0.9]}]}}),
    ("optimizer.param_groups[0].weight_decay",
     {"optimizer": {"name": "adamw", "param_groups": [{"params": "*.bias", "weight_decay": -1}]}}),
    ("optimizer.param_groups[0].lr", {"optimizer": {"name": "sgd", "param_groups": [{"params": ["*"], "lr": 0}]}}),
    ("local_steps", {"local_steps": 5}),  # only in mode local-sgd
    ("local_steps", {"mode": "local-sgd", "local_steps": 0}),
    ("outer_optimizer", {"outer_optimizer": "sgd"}),
    ("outer_optimizer.lr", {"mode": "local-sgd", "outer_optimizer": {"name": "sgd", "lr": -1}}),
    ("outer_optimizer.param_groups", {"mode": "local-sgd", "outer_optimizer": {"name": "sgd", "param_groups": [
        {"params": ["*"]}]}}),
    ("outer_sync", {"mode": "local-sgd", "outer_sync": 1}),
    ("outer_sync", {"outer_sync": True}),
    ("staleness_scaling", {"mode": "local-sgd", "staleness_scaling": True}),
    ("staleness_scaling", {"mode": "local-sgd", "outer_sync": False, "staleness_scaling": "yes"}),
    ("fragments", {"mode": "local-sgd", "local_steps": 4, "fragments": 5}),
    ("bucket_mb", {"bucket_mb": -1}),
    ("bucket_mb", {"mode": "allreduce", "bucket_mb": 4}),
    ("fragments", {"mode": "ps-sync", "fragments": 2}),
    ("fragment_overlap", {"mode": "local-sgd", "local_steps": 10, "fragments": 3, "fragment_overlap": 4}),
    ("fragment_mix", {"mode": "local-sgd", "fragment_mix": 1.0}),
]


@pytest.mark.parametrize(("path", "overrides"), INVALID, ids=[f"{p}={o}" for p, o in INVALID])
def test_invalid_field(path: str, overrides: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as info:
        build(**overrides)
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert info.value.field == path


def test_every_field_has_an_invalid_case() -> None:
    wanted = {f.name for f in dataclasses.fields(JobSpec) if f.init}  # min_workers comes from workers
    nested = {
        "resources": Resources,
        "model": ComponentSpec,
        "optimizer": OptimizerSpec,
        "lr_schedule": ScheduleSpec,
    }
    for parent, cls in nested.items():
        wanted |= {f"{parent}.{f.name}" for f in dataclasses.fields(cls)}
    wanted.discard("optimizer.hyper")  # flat in the dict form: see test_invalid_hyperparameters
    assert wanted - {path for path, _ in INVALID} == set()


def test_missing_required_fields() -> None:
    with pytest.raises(SpecError, match=r"^model: is required"):
        JobSpec.from_dict({"dataset": "digits"})
    with pytest.raises(SpecError, match=r"^dataset: is required"):
        JobSpec(model=ComponentSpec(name="mlp"))


def test_bool_is_not_an_int() -> None:
    with pytest.raises(SpecError) as info:
        build(workers=True)
    assert str(info.value) == "workers: must be an integer between 1 and 1024, got True"
    with pytest.raises(SpecError, match=r"^batch_size: must be an integer >= 1, got True$"):
        build(batch_size=True)


def test_errors_name_the_field_when_nested_specs_stand_alone() -> None:
    with pytest.raises(SpecError, match=r"^cpus: "):
        Resources(cpus=-1)
    with pytest.raises(SpecError, match=r"^name: give exactly one"):
        ComponentSpec()
    with pytest.raises(SpecError, match=r"^lr: "):
        OptimizerSpec(lr=0)
    with pytest.raises(SpecError, match=r"^betas: "):
        OptimizerSpec("adam", hyper={"betas": 0.9})
    with pytest.raises(SpecError, match=r"^step_size: is required"):
        ScheduleSpec(name="step")


# --- unknown keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"wrokers": 2}, "wrokers: unknown field; did you mean 'workers'?"),
        ({"resources": {"gpu": 1}}, "resources.gpu: unknown key; did you mean 'gpus'?"),
        ({"model": {"name": "mlp", "arg": {}}}, "model.arg: unknown key; did you mean 'args'?"),
        (
            {"optimizer": {"name": "adam", "beta": [0.9, 0.99]}},
            "optimizer.beta: unknown hyperparameter for adam; did you mean 'betas'?",
        ),
        (
            {"lr_schedule": {"name": "step", "stepsize": 3}},
            "lr_schedule.stepsize: unknown key; did you mean 'step_size'?",
        ),
        ({"mode": "allreduc"}, "mode: unknown mode 'allreduc'; did you mean 'allreduce'?"),
    ],
)
def test_unknown_keys_suggest_a_name(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        build(**overrides)
    assert str(info.value).startswith(message)


def test_unknown_key_without_a_close_match_lists_the_valid_ones() -> None:
    with pytest.raises(SpecError, match=r"^resources.memory: unknown key \(valid: cpus, gpus\)$"):
        build(resources={"memory": 4})
    bad: dict[Any, Any] = {**BASE, 1: 2}
    with pytest.raises(SpecError, match=r"^spec: keys must be strings"):
        JobSpec.from_dict(bad)


# --- epochs / steps, staleness, total_steps -------------------------------------------------


def test_epochs_and_steps() -> None:
    assert (build().epochs, build().steps) == (1, None)
    assert (build(epochs=5).epochs, build(epochs=5).steps) == (5, None)
    assert (build(steps=10).epochs, build(steps=10).steps) == (None, 10)
    with pytest.raises(SpecError, match=r"^steps: give either epochs or steps, not both"):
        build(epochs=1, steps=1)


def test_staleness() -> None:
    ssp = build(mode="ps-ssp")
    assert ssp.staleness == 2 and ssp.effective_staleness == 2
    assert build(mode="ps-ssp", staleness=0).effective_staleness == 0
    assert build(mode="ps-ssp", staleness=7).effective_staleness == 7
    assert build(mode="ps-ssp", staleness=None) == ssp
    for mode in ("ps-sync", "ps-async", "allreduce"):
        assert build(mode=mode).effective_staleness == 0
        with pytest.raises(SpecError, match=r"^staleness: only applies to mode ps-ssp"):
            build(mode=mode, staleness=2)
    assert not build(mode="allreduce").is_ps
    assert all(build(mode=m).is_ps for m in ("ps-sync", "ps-async", "ps-ssp"))


def test_shards_take_every_compression() -> None:
    for compression in ("fp16", "bf16", "int8", "int4"):
        assert build(ps_shards=2, compression=compression).compression == compression


def test_every_ps_mode_is_elastic_over_shards() -> None:
    for mode in ("ps-sync", "ps-async", "ps-ssp"):
        spec = build(mode=mode, ps_shards=2, workers={"min": 1, "max": 3})
        assert (spec.ps_shards, spec.elastic, spec.workers, spec.min_workers) == (2, True, 3, 1)


def test_every_ps_mode_clips_over_shards_whatever_its_compression() -> None:
    for mode in ("ps-sync", "ps-async", "ps-ssp"):
        for compression in ("none", "bf16", "int8", "int4"):
            spec = build(mode=mode, ps_shards=4, clip_grad_norm=1.0, compression=compression)
            assert (spec.ps_shards, spec.clip_grad_norm, spec.compression) == (4, 1.0, compression)


def test_total_steps() -> None:
    assert build(steps=123).total_steps(10) == 123
    spec = build(workers=2, batch_size=8, epochs=3)
    assert spec.total_steps(100) == 3 * (100 // 16)
    assert spec.total_steps(16) == 3
    with pytest.raises(SpecError) as info:
        spec.total_steps(15)
    assert str(info.value).startswith("batch_size: ")
    assert "2 x 8 = 16" in str(info.value) and "15 samples" in str(info.value)


# --- optimizers -----------------------------------------------------------------------------

VALID_HYPER: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.9, "dampening": 0, "weight_decay": 1e-4, "nesterov": True},
    "adam": {"betas": [0.8, 0.99], "eps": 1e-8, "weight_decay": 0, "amsgrad": True},
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "amsgrad": False},
    "adagrad": {"lr_decay": 0.1, "weight_decay": 0, "initial_accumulator_value": 0.1, "eps": 0},
    "rmsprop": {"alpha": 0.9, "eps": 1e-8, "weight_decay": 0, "momentum": 0.5, "centered": True},
    "adadelta": {"rho": 0.95, "eps": 1e-6, "weight_decay": 0.0},
}


def test_every_optimizer_has_a_valid_case() -> None:
    assert set(VALID_HYPER) == set(OPTIMIZER_HYPERPARAMETERS)
    for name, hyper in VALID_HYPER.items():
        assert set(hyper) == OPTIMIZER_HYPERPARAMETERS[name]


@pytest.mark.parametrize("name", sorted(VALID_HYPER))
def test_valid_hyperparameters_round_trip(name: str) -> None:
    spec = build(optimizer={"name": name, "lr": 0.5, **VALID_HYPER[name]})
    assert set(spec.optimizer.hyper) == set(VALID_HYPER[name])
    assert spec.to_dict()["optimizer"] == {
        "name": name,
        "lr": 0.5,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in VALID_HYPER[name].items()},
    }
    assert JobSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("name", sorted(VALID_HYPER))
def test_hyperparameters_are_torch_keywords(name: str) -> None:
    torch = pytest.importorskip("torch")
    classes = {
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "adagrad": torch.optim.Adagrad,
        "rmsprop": torch.optim.RMSprop,
        "adadelta": torch.optim.Adadelta,
    }
    assert OPTIMIZER_HYPERPARAMETERS[name] <= set(inspect.signature(classes[name]).parameters)
    spec = build(optimizer={"name": name, **VALID_HYPER[name]})
    param = torch.nn.Parameter(torch.zeros(2))
    classes[name]([param], lr=spec.optimizer.lr, **spec.optimizer.hyper)  # torch accepts them


@pytest.mark.parametrize(
    ("optimizer", "path"),
    [
        ({"name": "adam", "momentum": 0.9}, "optimizer.momentum"),  # belongs to sgd
        ({"name": "sgd", "betas": [0.9, 0.9]}, "optimizer.betas"),
        ({"name": "adadelta", "alpha": 0.9}, "optimizer.alpha"),
        ({"name": "sgd", "nesterov": True}, "optimizer.nesterov"),  # no momentum
        (
            {"name": "sgd", "momentum": 0.9, "dampening": 0.1, "nesterov": True},
            "optimizer.nesterov",
        ),
        ({"name": "sgd", "nesterov": 1}, "optimizer.nesterov"),
        ({"name": "sgd", "dampening": -0.1}, "optimizer.dampening"),
        ({"name": "sgd", "weight_decay": "0"}, "optimizer.weight_decay"),
        ({"name": "adam", "betas": [0.9]}, "optimizer.betas"),
        ({"name": "adam", "betas": "0.9,0.99"}, "optimizer.betas"),
        ({"name": "adamw", "betas": [1.0, 0.99]}, "optimizer.betas[0]"),
        ({"name": "adam", "betas": [0.9, -0.1]}, "optimizer.betas[1]"),
        ({"name": "adam", "eps": -1e-8}, "optimizer.eps"),
        ({"name": "adamw", "amsgrad": "yes"}, "optimizer.amsgrad"),
        ({"name": "adagrad", "lr_decay": -1}, "optimizer.lr_decay"),
        (
            {"name": "adagrad", "initial_accumulator_value": -1},
            "optimizer.initial_accumulator_value",
        ),
        ({"name": "rmsprop", "alpha": -0.9}, "optimizer.alpha"),
        ({"name": "rmsprop", "centered": None}, "optimizer.centered"),
        ({"name": "rmsprop", "momentum": math.inf}, "optimizer.momentum"),
        ({"name": "adadelta", "rho": 1.5}, "optimizer.rho"),
        ({"name": None}, "optimizer.name"),
    ],
)
def test_invalid_hyperparameters(optimizer: dict[str, Any], path: str) -> None:
    with pytest.raises(SpecError) as info:
        build(optimizer=optimizer)
    assert str(info.value).startswith(f"{path}: "), str(info.value)


def test_a_hyperparameter_of_another_optimizer_lists_the_valid_ones() -> None:
    with pytest.raises(SpecError) as info:
        build(optimizer={"name": "adam", "momentum": 0.9})
    assert "amsgrad, betas, eps, weight_decay" in str(info.value)


# --- YAML and JSON parsing ------------------------------------------------------------------


def test_yaml_reads_exponents_as_floats() -> None:
    spec = JobSpec.from_yaml("model: mlp\ndataset: digits\noptimizer: {name: adam, lr: 1e-3}\n")
    assert spec.optimizer.lr == 0.001


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: [mlp\n", r"^yaml: invalid YAML"),
        ("- model\n- dataset\n", r"^yaml: top level must be a mapping, got list"),
        ("", r"^yaml: top level must be a mapping, got an empty document"),
        ("missing.yaml", r"^yaml: no such file: 'missing.yaml'"),
        ("model: mlp\ndataset: digits\nepoch: 3\n", r"^epoch: unknown field; did you mean"),
    ],
)
def test_from_yaml_errors(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        JobSpec.from_yaml(text)


def test_from_yaml_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^yaml: cannot read"):
        JobSpec.from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", r"^json: invalid JSON"),
        ("[1, 2]", r"^json: top level must be an object"),
        ('{"model": "mlp"}', r"^dataset: is required"),
    ],
)
def test_from_json_errors(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        JobSpec.from_json(text)


def test_spec_error_pickles_with_its_field() -> None:
    with pytest.raises(SpecError) as info:
        build(workers=0)
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.field, str(again)) == ("workers", str(info.value))


# ------------------------------------------------------------- hostile values
@pytest.mark.parametrize(("field", "extra"), [
    ("steps", {"steps": 10**400}),
    ("batch_size", {"batch_size": -(10**30)}),
    ("optimizer.lr", {"optimizer": {"name": "adam", "lr": 10**400}}),
    ("model.args.hidden", {"model": {"name": "mlp", "args": {"hidden": 10**400}}}),
])
def test_integers_beyond_64_bits_are_spec_errors(field: str, extra: dict) -> None:
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict({"model": "mlp", "dataset": "digits", **extra})
    assert e.value.field == field and "bits" in str(e.value)


def test_args_nested_deeper_than_the_limit_are_refused() -> None:
    args: dict = {}
    inner = args
    for _ in range(40):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(SpecError, match="nested deeper than 30 levels"):
        JobSpec.from_dict({"model": {"name": "mlp", "args": args}, "dataset": "digits"})
    text = '{"model": {"name": "mlp", "args": {"h": ' + "[" * 30_000 + "]" * 30_000 + '}}, "dataset": "digits"}'
    with pytest.raises(SpecError, match=r"json: nested too deeply \(the limit is 32 levels\)"):
        JobSpec.from_json(text)  # deeper than the JSON parser's recursion: refused, not a crash


def test_a_spec_over_the_size_limit_is_refused_before_it_is_parsed() -> None:
    text = json.dumps({"model": {"name": "mlp", "args": {"blobs": ["x" * 4000] * 20}}, "dataset": "digits"})
    with pytest.raises(SpecError, match="json: the spec is .* bytes; the limit is 65536"):
        JobSpec.from_json(text)


def test_strings_are_bounded() -> None:
    with pytest.raises(SpecError, match="model.args.s: is 5000 characters long; the limit is 4096"):
        JobSpec.from_dict({"model": {"name": "mlp", "args": {"s": "x" * 5000}}, "dataset": "digits"})
    with pytest.raises(SpecError, match="working_dir: is 5000 characters long"):
        JobSpec.from_dict({"model": "mlp", "dataset": "digits", "working_dir": "d" * 5000})


def test_staleness_scaling_needs_asynchronous_local_sgd() -> None:
    base = {"model": "mlp", "dataset": "digits", "mode": "local-sgd"}
    assert JobSpec.from_dict({**base, "outer_sync": False, "staleness_scaling": True}).staleness_scaling
    with pytest.raises(SpecError, match="staleness_scaling: applies with outer_sync: false"):
        JobSpec.from_dict({**base, "staleness_scaling": True})
    with pytest.raises(SpecError, match="staleness_scaling: only applies to mode local-sgd"):
        JobSpec.from_dict({"model": "mlp", "dataset": "digits", "staleness_scaling": False})


def test_bucket_mb_defaults_by_the_workers_device() -> None:
    base = {"model": "mlp", "dataset": "digits"}
    assert JobSpec.from_dict(base).effective_bucket_mb == 0.0
    assert JobSpec.from_dict({**base, "resources": {"gpus": 1}}).effective_bucket_mb == 25.0
    assert JobSpec.from_dict({**base, "bucket_mb": 2}).effective_bucket_mb == 2.0
    assert "bucket_mb" not in JobSpec.from_dict(base).to_dict()  # a ps spec's dict is still an allreduce one
    gpus = {**base, "resources": {"gpus": 1}, "ps_shards": 2}
    assert JobSpec.from_dict(gpus).effective_bucket_mb == 25.0  # a bucket's pieces go to their shards
    assert JobSpec.from_dict({**gpus, "clip_grad_norm": 1.0}).effective_bucket_mb == 25.0  # the norm after the last
    assert JobSpec.from_dict({**gpus, "compression": "int4"}).effective_bucket_mb == 25.0  # quantised piece by piece
    assert JobSpec.from_dict({**gpus, "bucket_mb": 1, "compression": "int8"}).bucket_mb == 1


def test_an_elastic_spec_round_trips_and_keeps_its_bounds() -> None:
    spec = build(workers={"min": 2, "max": 4})
    assert (spec.workers, spec.min_workers, spec.elastic) == (4, 2, True)
    assert spec.to_dict()["workers"] == {"min": 2, "max": 4} and "min_workers" not in spec.to_dict()
    assert JobSpec.from_json(spec.to_json()) == spec
    assert spec.replace(seed=5).min_workers == 2, "replace keeps the bounds (dataclasses.replace would not)"
    fixed = build(workers=3)
    assert (fixed.min_workers, fixed.elastic, fixed.to_dict()["workers"]) == (3, False, 3)
    with pytest.raises(SpecError, match="min_workers: unknown field"):
        JobSpec.from_dict({**fixed.to_dict(), "min_workers": 1})
