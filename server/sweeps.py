"""A sweep's search: an Optuna study (its sampler and pruner, driven with ask/tell) that picks each
trial's values of the space, takes the trial's evaluations and says when to prune it.

Plain: no jobs, no database. The study lives in memory; ``Search(spec, seed, history)`` rebuilds
it from the trials a sweep has persisted (``PastTrial``: ended ones are added whole, running ones
are enqueued with their values and asked again), so that a sweep resumes after a restart with
the same knowledge (and, for a grid, the same order) it had.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState as OptunaState

from gradhub.proto.contract.errors import StateError
from gradhub.proto.contract.sweep import (
    ASHA_REDUCTION_FACTOR,
    MEDIAN_STARTUP_TRIALS,
    Param,
    SweepSpec,
    TrialState,
)

__all__ = ["PastTrial", "Sample", "Search"]

_TO_OPTUNA = {TrialState.COMPLETE: OptunaState.COMPLETE, TrialState.PRUNED: OptunaState.PRUNED,
              TrialState.FAILED: OptunaState.FAIL}


@dataclass(frozen=True)
class Sample:
    """What ``Search.ask`` chose for a trial: Optuna's values (a choice is its index) and the
    job's (the choice itself), and the study's notes about the trial (a grid's point)."""

    number: int
    internal: dict[str, Any]
    values: dict[str, Any]
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PastTrial:
    """A trial as the sweep persisted it, to rebuild the study from."""

    number: int
    state: TrialState
    internal: Mapping[str, Any]
    value: float | None = None
    intermediate: Mapping[int, float] = field(default_factory=dict)
    notes: Mapping[str, Any] = field(default_factory=dict)


def distribution(param: Param) -> BaseDistribution:
    """The Optuna distribution of a dimension (a choice is over its indices: values may be lists)."""
    if param.kind == "choice":
        return CategoricalDistribution(tuple(range(len(param.values))))
    if param.kind == "int":
        return IntDistribution(int(param.low), int(param.high), log=param.log, step=int(param.step or 1))
    return FloatDistribution(param.low, param.high, log=param.log, step=None if param.log else param.step)


class _Grid(optuna.samplers.GridSampler):
    """Optuna's grid, without its ``study.stop()`` when the grid is done (which only works inside
    ``study.optimize``): the sweep's ``trials`` (at most the grid's size) bounds it instead."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: OptunaState,
                    values: Sequence[float] | None) -> None:
        return


class Search:
    """One sweep's study. ``ask`` the next trial's values, ``report`` its evaluations (True: prune
    it), ``tell`` how it ended. Not thread-safe: its sweep runner calls it from one thread."""

    def __init__(self, spec: SweepSpec, seed: int, history: Iterable[PastTrial] = ()) -> None:
        optuna.logging.set_verbosity(logging.WARNING)  # the runner logs what matters
        self.spec = spec
        self._dists = {path: distribution(p) for path, p in spec.space.items()}
        past = sorted(history, key=lambda t: t.number)
        # a restarted random sampler starts a new stream, not the one its first trials came from
        offset = len(past)
        self.study = optuna.create_study(
            direction="maximize" if spec.objective.mode == "max" else "minimize",
            sampler=self._sampler(seed, offset), pruner=self._pruner())
        self._live: dict[int, optuna.Trial] = {}
        self._reported: dict[int, set[int]] = {}
        for t in past:
            self._restore(t)

    def _sampler(self, seed: int, offset: int) -> optuna.samplers.BaseSampler:
        name = self.spec.search.name
        if name == "grid":  # the same seed, the same order of points: a resumed grid goes on where it was
            grid = {path: list(range(len(p.values))) if p.kind == "choice" else list(p.grid() or ())
                    for path, p in self.spec.space.items()}
            return _Grid(grid, seed=seed)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed + offset)
        # bayes: TPE, with the values of running trials taken as a lie (constant liar) so that
        # parallel trials spread out
        return optuna.samplers.TPESampler(n_startup_trials=self.spec.startup_trials, seed=seed + offset,
                                          constant_liar=True)

    def _pruner(self) -> optuna.pruners.BasePruner:
        prune = self.spec.prune
        if prune.name == "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=int(prune.options.get("startup_trials", MEDIAN_STARTUP_TRIALS)),
                n_warmup_steps=int(prune.options.get("warmup_steps", 0)))
        if prune.name == "asha":
            return optuna.pruners.SuccessiveHalvingPruner(
                min_resource=int(prune.options.get("min_resource", self.spec.job.eval_every)),
                reduction_factor=int(prune.options.get("reduction_factor", ASHA_REDUCTION_FACTOR)))
        return optuna.pruners.NopPruner()

    def _restore(self, t: PastTrial) -> None:
        internal = {k: v for k, v in t.internal.items() if k in self._dists}
        if t.state.terminal:
            value = t.value
            if t.state is TrialState.PRUNED and value is None and t.intermediate:
                value = t.intermediate[max(t.intermediate)]
            self.study.add_trial(optuna.trial.create_trial(
                state=_TO_OPTUNA[t.state], value=value if t.state is not TrialState.FAILED else None,
                params=internal, distributions={k: self._dists[k] for k in internal},
                system_attrs=dict(t.notes), intermediate_values={int(s): float(v) for s, v in t.intermediate.items()}))
            return
        self.study.enqueue_trial(internal)
        trial = self.study.ask(self._dists)
        self._live[t.number] = trial
        self._reported[t.number] = set()
        for step, value in sorted(t.intermediate.items()):
            self.report(t.number, int(step), float(value))

    # ------------------------------------------------------------------ the API
    def ask(self, number: int) -> Sample:
        """The values of trial ``number`` (the sweep's count of trials so far)."""
        if number in self._live:
            raise StateError(f"sweep trial {number} was asked for already")
        trial = self.study.ask(self._dists)
        self._live[number] = trial
        self._reported[number] = set()
        internal = dict(trial.params)
        notes = next(t.system_attrs for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        return Sample(number, internal, self.values(internal), dict(notes))

    def values(self, internal: Mapping[str, Any]) -> dict[str, Any]:
        """The job's values for Optuna's (a choice's index becomes the choice)."""
        out = {}
        for path, v in internal.items():
            p = self.spec.space[path]
            out[path] = p.values[int(v)] if p.kind == "choice" else v
        return out

    def report(self, number: int, step: int, value: float) -> bool:
        """Trial ``number`` measured ``value`` at ``step``: True when the pruner stops it there."""
        trial = self._trial(number)
        if step in self._reported[number]:
            return False
        self._reported[number].add(step)
        trial.report(value, step)
        return trial.should_prune()

    def tell(self, number: int, state: TrialState, value: float | None = None) -> float | None:
        """Trial ``number`` ended; the value Optuna keeps for it (a pruned one's last evaluation)."""
        trial = self._trial(number)
        del self._live[number]
        frozen = self.study.tell(trial, value if state is TrialState.COMPLETE else None, state=_TO_OPTUNA[state])
        return frozen.value

    def running(self) -> list[int]:
        return sorted(self._live)

    def _trial(self, number: int) -> optuna.Trial:
        trial = self._live.get(number)
        if trial is None:
            raise StateError(f"sweep trial {number} is not running")
        return trial
