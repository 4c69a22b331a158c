"""What the client shows of a sweep: ``SweepInfo`` with its trials as a leaderboard, and the
``Sweep`` handle that ``Client.sweep`` returns.

    sweep = client.sweep(SweepSpec.from_yaml("sweep.yaml"))
    info = sweep.wait()
    print(info.best_trial.params, info.best_trial.value)
    client.pull_best(sweep.id, "best.safetensors")
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from gradhub.proto.contract.errors import JobFailedError
from gradhub.proto.contract.sweep import SweepState, TrialState
from gradhub.proto.v1 import sweeps_pb2

if TYPE_CHECKING:
    from gradhub.client.client import Client


@dataclass(frozen=True)
class TrialInfo:
    number: int
    job_id: str
    state: TrialState
    params: dict[str, Any]
    value: float | None  # the objective (a pruned trial's last evaluation); None while it runs
    metrics: dict[str, float]
    step: int
    total_steps: int
    job_state: str
    reason: str
    evaluations: int
    created_at: float
    finished_at: float | None

    @classmethod
    def from_proto(cls, p: sweeps_pb2.Trial) -> TrialInfo:
        return cls(number=p.number, job_id=p.job_id, state=TrialState(p.state), params=json.loads(p.params_json or "{}"),
                   value=p.value if p.HasField("value") else None, metrics=dict(p.metrics), step=p.step,
                   total_steps=p.total_steps, job_state=p.job_state, reason=p.reason, evaluations=p.evaluations,
                   created_at=p.created_at, finished_at=p.finished_at or None)


@dataclass(frozen=True)
class SweepInfo:
    """A snapshot of a sweep; ``trials`` in leaderboard order (best first)."""

    id: str
    name: str
    owner: str
    state: SweepState
    reason: str
    created_at: float
    finished_at: float | None
    metric: str = ""
    mode: str = ""
    trials_total: int = 0
    parallel: int = 0
    best: int | None = None  # the best completed trial's number
    trials: tuple[TrialInfo, ...] = ()
    spec: dict[str, Any] = field(default_factory=dict)  # empty in list_sweeps' summaries

    @property
    def done(self) -> bool:
        return self.state.terminal

    @property
    def best_trial(self) -> TrialInfo | None:
        return next((t for t in self.trials if t.number == self.best), None) if self.best is not None else None

    @classmethod
    def from_proto(cls, p: sweeps_pb2.Sweep) -> SweepInfo:
        return cls(id=p.id, name=p.name, owner=p.owner, state=SweepState(p.state), reason=p.reason,
                   created_at=p.created_at, finished_at=p.finished_at or None, metric=p.metric, mode=p.mode,
                   trials_total=p.trials_total, parallel=p.parallel, best=p.best if p.HasField("best") else None,
                   trials=tuple(TrialInfo.from_proto(t) for t in p.trials),
                   spec=json.loads(p.spec_json) if p.spec_json else {})

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``gradhub status SWEEP --json``), with ``best_trial`` spelled out."""
        out = asdict(self)
        out["best_trial"] = asdict(self.best_trial) if self.best_trial else None
        return out


class Sweep:
    """A handle on a submitted sweep."""

    def __init__(self, client: Client, info: SweepInfo) -> None:
        self.client, self.info = client, info

    @property
    def id(self) -> str:
        return self.info.id

    def refresh(self) -> SweepInfo:
        self.info = self.client.get_sweep(self.id)
        return self.info

    def wait(self, timeout: float | None = None) -> SweepInfo:
        """Block until the sweep ends; JobFailedError unless it SUCCEEDED (a trial completed)."""
        for info in self.client.watch_sweep(self.id, timeout=timeout):
            self.info = info
        if self.info.state != SweepState.SUCCEEDED:
            raise JobFailedError(f"sweep {self.id} {self.info.state}: {self.info.reason or 'no reason given'}")
        return self.info

    def cancel(self) -> SweepInfo:
        self.info = self.client.cancel_sweep(self.id)
        return self.info

    def __repr__(self) -> str:
        return f"Sweep(id={self.id!r}, state={self.info.state!r}, trials={len(self.info.trials)}/{self.info.trials_total})"
