"""Rich renderings of sweeps for ``gradhub status SWEEP`` and ``gradhub sweep --wait``: the
leaderboard (trials best first, with their values of the space) and the sweeps table."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradhub.client.progress import ago, number
from gradhub.client.sweeps import SweepInfo, TrialInfo
from gradhub.proto.contract.sweep import SweepState, TrialState

SWEEP_STYLES = {SweepState.RUNNING: "cyan", SweepState.SUCCEEDED: "green", SweepState.FAILED: "bold red",
                SweepState.CANCELLED: "yellow"}
TRIAL_STYLES = {TrialState.RUNNING: "cyan", TrialState.COMPLETE: "green", TrialState.PRUNED: "yellow",
                TrialState.FAILED: "red"}


def _value(v: Any) -> str:
    if isinstance(v, float):
        return number(v)
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


def sweep_header(info: SweepInfo) -> Text:
    search = info.spec.get("search", "")
    search = search.get("name", "") if isinstance(search, dict) else search
    prune = info.spec.get("prune", "none")
    prune = prune.get("name", "") if isinstance(prune, dict) else prune
    done = sum(1 for t in info.trials if t.state is not TrialState.RUNNING)
    text = Text.assemble((f"{info.id}", "bold"), f" {info.name}  ", (str(info.state), SWEEP_STYLES[info.state]),
                         f"  {done}/{info.trials_total} trials ended, {info.parallel} at once; search {search}, "
                         f"prune {prune}; objective {info.metric} ({info.mode})")
    if info.owner:
        text.append(f"; owner {info.owner}")
    if info.reason:
        text.append(f"\n{info.reason}")
    best = info.best_trial
    if best is not None and best.value is not None:
        params = ", ".join(f"{k}={_value(v)}" for k, v in sorted(best.params.items()))
        text.append(f"\nbest: trial {best.number} ({best.job_id}) {info.metric} {number(best.value)}: {params}")
    return text


def leaderboard(info: SweepInfo) -> Table:
    """Trials best first: rank, trial, job, state, the objective, each value of the space, steps."""
    paths = sorted({k for t in info.trials for k in t.params})
    table = Table(show_edge=False, pad_edge=False)
    for column in ("#", "trial", "job", "state", info.metric or "objective", *paths, "step", "note"):
        table.add_column(column, overflow="fold")
    for rank, t in enumerate(info.trials, 1):
        table.add_row(str(rank) if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else "", str(t.number),
                      t.job_id, Text(_trial_state(t), TRIAL_STYLES[t.state]), _objective(info, t),
                      *(_value(t.params.get(p, "")) for p in paths),
                      f"{t.step}/{t.total_steps}" if t.total_steps else str(t.step), _note(t))
    return table


def sweep_details(info: SweepInfo) -> RenderableType:
    return Group(sweep_header(info), leaderboard(info)) if info.trials else sweep_header(info)


def sweeps_table(sweeps: Iterable[SweepInfo]) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    for column in ("sweep", "name", "state", "owner", "age"):
        table.add_column(column)
    for s in sweeps:
        table.add_row(s.id, s.name, Text(str(s.state), SWEEP_STYLES[s.state]), s.owner or "-", ago(s.created_at))
    return table


def _trial_state(t: TrialInfo) -> str:
    if t.state is TrialState.RUNNING and t.job_state:
        return t.job_state.lower()  # queued or running
    return t.state.lower()


def _objective(info: SweepInfo, t: TrialInfo) -> str:
    if t.value is not None:
        return number(t.value)
    current = t.metrics.get(info.metric)
    return f"({number(current)})" if current is not None else "-"


def _note(t: TrialInfo) -> str:
    if t.state is TrialState.PRUNED:
        return f"pruned at step {t.step}"
    return t.reason if t.state is TrialState.FAILED else ""
