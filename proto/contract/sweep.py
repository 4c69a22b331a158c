"""The sweep specification: a base job, a search space over its fields, an objective, and how
many trials run, how many at once and how they are pruned; validated when it is built.

What a user writes as ``SWEEP.yaml``::

    job: {...}            # a job spec, inline; or `base: job.yaml` (relative to this file)
    search: random        # grid | random | bayes (or {name: bayes, startup_trials: 4})
    space:                # any job spec field, by its dotted path
      optimizer.lr: {loguniform: [0.0001, 0.05]}
      batch_size: {choice: [16, 32]}
      model.args.hidden: {choice: [[64], [128]]}
    objective: {metric: val_accuracy, mode: max}
    trials: 6
    parallel: 2
    prune: median         # none | median | asha (or {name: asha, min_resource: 40, reduction_factor: 3})

Errors are ``SpecError``s naming the field (``space.optimizer.lr: ...``). The states of a sweep
and of its trials, and their allowed transitions, are here too: client and server share them.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from gradhub.proto.contract._validate import (
    check_choice,
    check_int,
    check_keys,
    check_mapping,
    check_number,
    check_str,
    json_value,
    prefixed,
    type_name,
)
from gradhub.proto.contract.errors import SpecError, StateError
from gradhub.proto.contract.spec import MAX_SPEC_BYTES, JobSpec

SEARCHES = ("grid", "random", "bayes")
PRUNERS = ("none", "median", "asha")
KINDS = ("loguniform", "uniform", "int", "choice")
MODES = ("max", "min")
MAX_TRIALS = 1000
MAX_GRID = 10_000
MAX_SWEEP_BYTES = 2 * MAX_SPEC_BYTES
# fields a trial's job gets from the sweep itself, never from the space
NOT_SEARCHABLE = frozenset({"name", "working_dir"})
# options of each search and pruner (their mapping form), with what they must be
SEARCH_OPTIONS: dict[str, frozenset[str]] = {"grid": frozenset(), "random": frozenset(),
                                             "bayes": frozenset({"startup_trials"})}
PRUNE_OPTIONS: dict[str, frozenset[str]] = {
    "none": frozenset(), "median": frozenset({"startup_trials", "warmup_steps"}),
    "asha": frozenset({"min_resource", "reduction_factor"}),
}
MEDIAN_STARTUP_TRIALS = 3  # completed trials before the median rule prunes (Tune's and Katib's default)
ASHA_REDUCTION_FACTOR = 3


# --- states ---------------------------------------------------------------------------------


class SweepState(StrEnum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"  # every trial ended, at least one completed
    FAILED = "FAILED"  # every trial ended, none completed
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self is not SweepState.RUNNING

    def to(self, new: SweepState | str) -> SweepState:
        """``new``, when a sweep in this state may move there; else ``StateError``."""
        return _checked("sweep", SWEEP_TRANSITIONS, self, SweepState(new))


class TrialState(StrEnum):
    RUNNING = "RUNNING"  # its job is queued or running
    COMPLETE = "COMPLETE"  # its job succeeded and reported the objective
    PRUNED = "PRUNED"  # stopped early by the pruner: its job was cancelled
    FAILED = "FAILED"  # its job failed or was cancelled by a user, or its spec was invalid

    @property
    def terminal(self) -> bool:
        return self is not TrialState.RUNNING

    def to(self, new: TrialState | str) -> TrialState:
        return _checked("trial", TRIAL_TRANSITIONS, self, TrialState(new))


SWEEP_TRANSITIONS: dict[Any, frozenset[Any]] = {
    SweepState.RUNNING: frozenset({SweepState.SUCCEEDED, SweepState.FAILED, SweepState.CANCELLED}),
    SweepState.SUCCEEDED: frozenset(), SweepState.FAILED: frozenset(), SweepState.CANCELLED: frozenset(),
}
TRIAL_TRANSITIONS: dict[Any, frozenset[Any]] = {
    TrialState.RUNNING: frozenset({TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAILED}),
    TrialState.COMPLETE: frozenset(), TrialState.PRUNED: frozenset(), TrialState.FAILED: frozenset(),
}


def _checked(what: str, table: dict[Any, frozenset[Any]], old: Any, new: Any) -> Any:
    if new not in table[old]:
        allowed = ", ".join(sorted(table[old])) or "none: it is final"
        raise StateError(f"{what} state: {old} -> {new} is not an allowed transition (from {old}: {allowed})")
    return new


# --- the space ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One dimension of the space: ``loguniform``/``uniform`` [low, high], ``int`` [low, high]
    (``step``, ``log``), or ``choice`` of ``values`` (any JSON values: lists too)."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    values: tuple[Any, ...] = ()
    step: float | None = None
    log: bool = False

    @classmethod
    def parse(cls, raw: Any) -> Param:
        check_mapping("", raw)
        kinds = [k for k in raw if k in KINDS]
        if len(kinds) != 1:
            raise SpecError("", f"give exactly one of {', '.join(KINDS)}, e.g. {{loguniform: [0.0001, 0.1]}}; "
                                f"got {dict(raw)!r}")
        kind = kinds[0]
        extra = {"int": ("step", "log"), "uniform": ("step",)}.get(kind, ())
        check_keys("", raw, (kind, *extra), f"option of {kind}")
        value = raw[kind]
        if kind == "choice":
            if not isinstance(value, list | tuple) or not value:
                raise SpecError("choice", f"must be a non-empty list of values, got {value!r}")
            values = tuple(json_value(f"choice[{i}]", v) for i, v in enumerate(value))
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise SpecError("choice", f"lists a value twice: {list(values)!r}")
            return cls(kind, values=values)
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise SpecError(kind, f"must be [low, high], got {value!r}")
        low: float
        high: float
        step: float | None
        if kind == "int":
            low, high = (check_int(f"{kind}[{i}]", v) for i, v in enumerate(value))
            step = check_int("step", raw.get("step", 1), lo=1)
            log = raw.get("log", False)
            if not isinstance(log, bool):
                raise SpecError("log", f"must be true or false, got {log!r}")
            if log and (low < 1 or step != 1):
                raise SpecError("log", "needs low >= 1 and step 1 (as Optuna does)")
        else:
            lo_open = kind == "loguniform"
            low, high = (check_number(f"{kind}[{i}]", v, lo=0 if lo_open else None, lo_open=lo_open)
                         for i, v in enumerate(value))
            step = None if raw.get("step") is None else check_number("step", raw["step"], lo=0, lo_open=True)
            log = kind == "loguniform"
        if not low < high:
            raise SpecError(kind, f"low must be below high, got [{low}, {high}]")
        return cls(kind, low=low, high=high, step=step, log=log)

    def grid(self) -> tuple[Any, ...] | None:
        """Every value, for a grid search (None: a continuous range)."""
        if self.kind == "choice":
            return self.values
        if self.kind == "int":
            n = (int(self.high) - int(self.low)) // int(self.step or 1) + 1
            return tuple(int(self.low) + i * int(self.step or 1) for i in range(min(n, MAX_GRID + 1)))
        return None

    def probes(self) -> tuple[Any, ...]:
        """Values that show whether the field takes this kind of value (the ends of a range)."""
        if self.kind == "choice":
            return self.values
        if self.kind == "int":
            return (int(self.low), int(self.high))
        return (self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"choice": list(self.values)}
        low, high = (int(self.low), int(self.high)) if self.kind == "int" else (self.low, self.high)
        out: dict[str, Any] = {self.kind: [low, high]}
        if self.step is not None and (self.kind != "int" or self.step != 1):
            out["step"] = int(self.step) if self.kind == "int" else self.step
        if self.kind == "int" and self.log:
            out["log"] = True
        return out


def apply(job: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """``job`` (a job spec's dict form) with each dotted path of ``params`` set to its value."""
    out = copy.deepcopy(dict(job))
    for path, value in params.items():
        node = out
        parts = path.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str) and i == 0 and part in ("model", "dataset", "loss", "optimizer",
                                                              "lr_schedule", "metrics"):
                child = node[part] = {"factory": child} if ":" in child else {"name": child}
            if not isinstance(child, dict):
                raise SpecError(".".join(parts[:i + 1]), f"is {type_name(child)} {child!r}, not a mapping: "
                                                        f"{path!r} cannot be set")
            node = child
        node[parts[-1]] = copy.deepcopy(value)
    return out


# --- the sweep ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """A search or a pruner: its name and options (``{name: asha, min_resource: 40}``)."""

    name: str
    options: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> Any:
        return {"name": self.name, **self.options} if self.options else self.name


def _named(path: str, raw: Any, allowed: dict[str, frozenset[str]]) -> Choice:
    if isinstance(raw, str):
        raw = {"name": raw}
    check_mapping(path, raw)
    name = check_choice(f"{path}.name" if len(raw) > 1 else path, raw.get("name"), allowed, path)
    check_keys(path, raw, {"name", *allowed[name]}, f"option of {path} {name}")
    options = {k: check_int(f"{path}.{k}", v, lo=2 if k == "reduction_factor" else 0 if k == "warmup_steps"
                            else 1) for k, v in raw.items() if k != "name"}
    return Choice(name, options)


@dataclass(frozen=True, kw_only=True)
class Objective:
    metric: str
    mode: str = "max"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode}

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is better than ``b``."""
        return a > b if self.mode == "max" else a < b


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """A sweep; build it with ``from_dict``, ``from_json`` or ``from_yaml`` (which reads ``base:``)."""

    job: JobSpec
    search: Choice
    space: Mapping[str, Param]
    objective: Objective
    trials: int
    parallel: int = 1
    prune: Choice = field(default_factory=lambda: Choice("none"))
    seed: int | None = None
    name: str = ""

    # --- derived values ---

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.grid() or ()) for p in self.space.values())

    @property
    def startup_trials(self) -> int:
        """bayes: trials sampled at random before TPE models the results."""
        return int(self.search.options.get("startup_trials", max(2, min(10, self.trials // 3))))

    def trial_spec(self, params: Mapping[str, Any], name: str) -> JobSpec:
        """The job of a trial with these values of the space."""
        return JobSpec.from_dict({**apply(self.job.to_dict(), params), "name": name})

    # --- conversion ---

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "job": self.job.to_dict(), "search": self.search.to_dict(),
            "space": {k: p.to_dict() for k, p in self.space.items()}, "objective": self.objective.to_dict(),
            "trials": self.trials, "parallel": self.parallel, "prune": self.prune.to_dict(),
        }
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> SweepSpec:
        if len(text) > MAX_SWEEP_BYTES:
            raise SpecError("json", f"the sweep is {len(text)} bytes; the limit is {MAX_SWEEP_BYTES}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise SpecError("json", f"invalid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepSpec:
        """Read a sweep file; ``base:`` (a job file) and the job's ``working_dir`` are taken
        relative to the folder of the file that names them."""
        path = Path(path)
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_loader())
        except OSError as e:
            raise SpecError("yaml", f"cannot read {str(path)!r}: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise SpecError("yaml", f"invalid YAML: {e}") from e
        check_mapping("sweep", data)
        data = dict(data)
        job_dir = path.parent
        if "base" in data:
            if "job" in data:
                raise SpecError("base", "give either job (inline) or base (a job file), not both")
            base = Path(check_str("base", data.pop("base")))
            base = base if base.is_absolute() else path.parent / base
            with prefixed("base"):
                if not base.is_file():
                    raise SpecError("", f"no such job file: {str(base)!r}")
                data["job"] = JobSpec.from_yaml(base).to_dict()
            job_dir = base.parent
        job = data.get("job")
        if isinstance(job, Mapping) and isinstance(job.get("working_dir"), str) and not os.path.isabs(
                job["working_dir"]):
            data["job"] = {**job, "working_dir": str((job_dir / job["working_dir"]).resolve())}
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> SweepSpec:
        check_mapping("sweep", data)
        check_keys("", data, ("name", "job", "base", "search", "space", "objective", "trials", "parallel",
                              "prune", "seed"), "sweep field")
        if "base" in data:
            raise SpecError("base", "is read from a sweep file (SweepSpec.from_yaml); inline the job as `job:`")
        if "job" not in data:
            raise SpecError("job", "is required: the job each trial runs (inline), or `base: job.yaml`")
        if not isinstance(data["job"], JobSpec):
            check_mapping("job", data["job"])
        with prefixed("job"):
            job = JobSpec.coerce(data["job"])
        search = _named("search", data.get("search", "random"), SEARCH_OPTIONS)
        space = _space(data.get("space"), job, search.name)
        objective = _objective(data.get("objective"))
        grid = math.prod(len(p.grid() or ()) for p in space.values())
        if "trials" not in data and search.name != "grid":
            raise SpecError("trials", f"is required for search {search.name} (how many jobs to run in all)")
        trials = check_int("trials", data.get("trials", grid), lo=1, hi=MAX_TRIALS)
        if search.name == "grid" and trials > grid:
            raise SpecError("trials", f"the grid has {grid} points; give at most {grid} (or leave trials out)")
        parallel = check_int("parallel", data.get("parallel", 1), lo=1, hi=trials)
        prune = _named("prune", data.get("prune", "none"), PRUNE_OPTIONS)
        if prune.name != "none":
            if not job.eval_every:
                raise SpecError("prune", f"{prune.name} stops trials by their evaluations: set job.eval_every "
                                         "(steps between evaluations), or prune: none")
            if not objective.metric.startswith("val_"):
                raise SpecError("objective.metric", f"pruning compares evaluations (val_*), but the objective "
                                                    f"is {objective.metric!r}; use a val_ metric or prune: none")
        seed = data.get("seed")
        if seed is not None:
            seed = check_int("seed", seed, lo=0, hi=2**32 - 1)
        name = data.get("name") or job.name
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            raise SpecError("name", f"must be a string of 1 to 64 characters, got {name!r}")
        return cls(job=job, search=search, space=space, objective=objective, trials=trials, parallel=parallel,
                   prune=prune, seed=seed, name=name)


def _space(raw: Any, job: JobSpec, search: str) -> dict[str, Param]:
    check_mapping("space", raw)
    if not raw:
        raise SpecError("space", "must name at least one job field to search, e.g. optimizer.lr: "
                                 "{loguniform: [0.0001, 0.1]}")
    space: dict[str, Param] = {}
    base = job.to_dict()
    for path, spec in raw.items():
        if not isinstance(path, str) or not path or any(not p for p in path.split(".")):
            raise SpecError("space", f"keys must be dotted job fields like optimizer.lr, got {path!r}")
        where = f"space.{path}"
        if path.split(".")[0] in NOT_SEARCHABLE:
            raise SpecError(where, "is set by the sweep for each trial and cannot be searched")
        with prefixed(where):
            param = Param.parse(spec)
        if search == "grid" and param.grid() is None:
            raise SpecError(where, f"search grid needs discrete values (choice or int), not {param.kind}; "
                                   "use search random or bayes")
        if search == "grid" and len(param.grid() or ()) > MAX_GRID:
            raise SpecError(where, f"has more than {MAX_GRID} values: too many for a grid")
        for value in param.probes():  # every choice, the ends of a range: does the job take it?
            try:
                JobSpec.from_dict(apply(base, {path: value}))
            except SpecError as e:
                raise SpecError(where, f"{value!r} does not make a valid job ({e})") from None
        space[path] = param
    return space


def _objective(raw: Any) -> Objective:
    if raw is None:
        raise SpecError("objective", "is required: {metric: val_accuracy, mode: max} (or val_loss, min)")
    if isinstance(raw, str):
        raw = {"metric": raw}
    check_mapping("objective", raw)
    check_keys("objective", raw, ("metric", "mode"), "key")
    metric = check_str("objective.metric", raw.get("metric"))
    if "mode" not in raw:
        raise SpecError("objective.mode", f"is required: max or min (is a higher {metric} better?)")
    mode = check_choice("objective.mode", raw["mode"], MODES, "mode")
    return Objective(metric=metric, mode=mode)


def _loader() -> type[yaml.SafeLoader]:
    from gradhub.proto.contract.spec import _YamlLoader

    return _YamlLoader
