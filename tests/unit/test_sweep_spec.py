"""The sweep file: the issue's format parses, ``base:`` is read relative to the file, and every
mistake is a SpecError naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gradhub.proto.contract.errors import SpecError, StateError
from gradhub.proto.contract.sweep import SweepSpec, SweepState, TrialState, apply

JOB = {"name": "digits", "model": {"name": "mlp", "args": {"hidden": [32]}}, "dataset": "digits",
       "optimizer": "adam", "steps": 50, "eval_every": 10}
ISSUE = f"""
job: {JOB}
search: random
space:
  optimizer.lr: {{loguniform: [0.0001, 0.05]}}
  batch_size: {{choice: [16, 32]}}
  model.args.hidden: {{choice: [[64], [128]]}}
objective: {{metric: val_accuracy, mode: max}}
trials: 6
parallel: 2
prune: median
"""


def sweep(**changes: object) -> dict:
    base = {"job": JOB, "search": "random", "space": {"optimizer.lr": {"loguniform": [1e-4, 0.05]}},
            "objective": {"metric": "val_accuracy", "mode": "max"}, "trials": 4, "parallel": 2, "prune": "median"}
    return {**base, **changes}


def test_the_issue_format_parses_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(ISSUE)
    spec = SweepSpec.from_yaml(path)
    assert (spec.search.name, spec.trials, spec.parallel, spec.prune.name) == ("random", 6, 2, "median")
    assert spec.space["model.args.hidden"].values == ([64], [128])
    assert spec.objective.metric == "val_accuracy" and spec.objective.mode == "max"
    assert SweepSpec.from_json(spec.to_json()) == spec
    trial = spec.trial_spec({"optimizer.lr": 0.003, "batch_size": 16, "model.args.hidden": [128]}, "t0")
    assert (trial.optimizer.name, trial.optimizer.lr, trial.batch_size, trial.model.args["hidden"]) == (
        "adam", 0.003, 16, [128])
    assert trial.name == "t0"


def test_base_is_read_relative_to_the_sweep_file(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "job.yaml").write_text(yaml.safe_dump({**JOB, "working_dir": "code"}))
    data = sweep()
    del data["job"]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({**data, "base": "jobs/job.yaml"}))
    spec = SweepSpec.from_yaml(tmp_path / "sweep.yaml")
    assert spec.job.model.args == {"hidden": [32]}
    assert spec.job.working_dir == str((tmp_path / "jobs" / "code").resolve())  # relative to the job file
    (tmp_path / "both.yaml").write_text(yaml.safe_dump({**data, "base": "jobs/job.yaml", "job": JOB}))
    with pytest.raises(SpecError, match="^base: give either job"):
        SweepSpec.from_yaml(tmp_path / "both.yaml")
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump({**data, "base": "nope.yaml"}))
    with pytest.raises(SpecError, match="^base: no such job file"):
        SweepSpec.from_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("changes,field,words", [
    ({"job": None}, "job", "mapping"),
    ({"search": "bayesian"}, "search", "did you mean 'bayes'"),
    ({"search": {"name": "bayes", "startup": 3}}, "search.startup", "did you mean 'startup_trials'"),
    ({"space": {}}, "space", "at least one"),
    ({"space": {"optimizer.lrr": {"uniform": [0.1, 0.2]}}}, "space.optimizer.lrr", "valid job"),
    ({"space": {"batch_sise": {"choice": [16]}}}, "space.batch_sise", "did you mean 'batch_size'"),
    ({"space": {"batch_size": {"choice": [0, 16]}}}, "space.batch_size", "0 does not make a valid job"),
    ({"space": {"name": {"choice": ["a", "b"]}}}, "space.name", "set by the sweep"),
    ({"space": {"optimizer.lr": {"loguniform": [0, 0.1]}}}, "space.optimizer.lr.loguniform[0]", "> 0"),
    ({"space": {"optimizer.lr": {"uniform": [0.1, 0.01]}}}, "space.optimizer.lr.uniform", "below high"),
    ({"space": {"optimizer.lr": {"uniform": [0.1, 0.2], "int": [1, 2]}}}, "space.optimizer.lr", "exactly one"),
    ({"space": {"batch_size": {"choice": [16, 16]}}}, "space.batch_size.choice", "twice"),
    ({"search": "grid", "space": {"optimizer.lr": {"uniform": [0.1, 0.2]}}}, "space.optimizer.lr", "discrete"),
    ({"search": "grid", "space": {"batch_size": {"choice": [16, 32]}}, "trials": 3}, "trials", "2 points"),
    ({"objective": None}, "objective", "required"),
    ({"objective": {"metric": "val_accuracy"}}, "objective.mode", "max or min"),
    ({"objective": {"metric": "val_accuracy", "mode": "up"}}, "objective.mode", "max, min"),
    ({"objective": {"metric": "loss", "mode": "min"}}, "objective.metric", "val_"),
    ({"trials": 0}, "trials", "between 1 and 1000"),
    ({"parallel": 5}, "parallel", "between 1 and 4"),
    ({"prune": "hyperband"}, "prune", "choose one of asha, median, none"),
    ({"prune": {"name": "asha", "reduction_factor": 1}}, "prune.reduction_factor", ">= 2"),
    ({"job": {**JOB, "eval_every": 0}}, "prune", "eval_every"),
    ({"triels": 3}, "triels", "did you mean 'trials'"),
])
def test_mistakes_name_their_field(changes: dict, field: str, words: str) -> None:
    with pytest.raises(SpecError) as e:
        SweepSpec.from_dict(sweep(**changes))
    assert e.value.field == field, str(e.value)
    assert words in str(e.value)


def test_grid_defaults_to_its_size_and_others_need_trials() -> None:
    data = sweep(search="grid", space={"batch_size": {"choice": [16, 32]}, "seed": {"int": [0, 2]}})
    del data["trials"]
    assert SweepSpec.from_dict(data).trials == 6
    data = sweep()
    del data["trials"]
    with pytest.raises(SpecError, match="^trials: is required"):
        SweepSpec.from_dict(data)


def test_apply_sets_dotted_paths_without_touching_the_base() -> None:
    base = {"optimizer": "adam", "model": {"name": "mlp"}}
    out = apply(base, {"optimizer.lr": 0.1, "model.args.hidden": [8]})
    assert out == {"optimizer": {"name": "adam", "lr": 0.1}, "model": {"name": "mlp", "args": {"hidden": [8]}}}
    assert base == {"optimizer": "adam", "model": {"name": "mlp"}}
    with pytest.raises(SpecError, match="^batch_size: is int"):
        apply({"batch_size": 32}, {"batch_size.x": 1})


def test_states_allow_only_their_transitions() -> None:
    assert SweepState.RUNNING.to("CANCELLED") is SweepState.CANCELLED
    assert TrialState.RUNNING.to("PRUNED") is TrialState.PRUNED
    with pytest.raises(StateError, match="COMPLETE -> RUNNING"):
        TrialState.COMPLETE.to("RUNNING")
    with pytest.raises(StateError):
        SweepState.SUCCEEDED.to("FAILED")
