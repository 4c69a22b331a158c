"""Sweeps on a real server (port 0) and the session's local Ray: small random and bayes sweeps of
a tiny MLP on digits with median pruning. The leaderboard is sorted by the objective, every trial
is a job of the sweep's owner, pruned trials were pruned at an evaluation before their last step,
and the best trial's checkpoint, pulled and evaluated here on digits' validation split as a worker
does, gives the objective the sweep reported."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from gradhub.client.cli import app
from gradhub.client.client import Client
from gradhub.client.sweeps import SweepInfo
from gradhub.proto.contract.errors import SpecError
from gradhub.proto.contract.states import JobState
from gradhub.proto.contract.sweep import SweepState, TrialState
from gradhub.server.app import Server
from gradhub.worker.data import build_datasets, build_loss, evaluate
from gradhub.worker.models import mlp

STEPS, EVAL_EVERY, TRIALS = 200, 20, 4
SWEEP_TIMEOUT_S = 240.0


def job() -> dict:
    return {"name": "digits", "mode": "ps-sync", "workers": 1, "resources": {"cpus": 0.5},
            "model": {"name": "mlp", "args": {"hidden": [32]}}, "dataset": "digits",
            "optimizer": {"name": "adam", "lr": 0.01}, "batch_size": 32, "steps": STEPS, "seed": 3,
            "eval_every": EVAL_EVERY}


def sweep_dict(search: str, seed: int) -> dict:
    # lr spans six decades: the low end barely learns in 60 steps, so the median rule has work
    return {"job": job(), "search": search, "seed": seed,
            "space": {"optimizer.lr": {"loguniform": [1e-6, 0.03]}, "model.args.hidden": {"choice": [[16], [32]]}},
            "objective": {"metric": "val_accuracy", "mode": "max"}, "trials": TRIALS, "parallel": 2,
            "prune": {"name": "median", "startup_trials": 1}}


def evaluate_checkpoint(path: Path, hidden: list[int]) -> float:
    """val_accuracy of the checkpoint on digits' validation split, computed as a worker does."""
    model = mlp(hidden=hidden)
    model.load_state_dict(load_file(path))
    _, val = build_datasets("digits", None, {}, 0.2)
    assert val is not None
    return evaluate(model, val, build_loss("cross_entropy", None, {}))["val_accuracy"]


def check_leaderboard(info: SweepInfo) -> None:
    assert info.state == SweepState.SUCCEEDED, info.reason
    assert len(info.trials) == TRIALS
    values = [t.value for t in info.trials if t.state is TrialState.COMPLETE]
    assert values and all(v is not None for v in values)
    assert values == sorted(values, reverse=True), "the leaderboard is sorted by the objective, best first"
    ranks = [t.state for t in info.trials]
    assert ranks == sorted(ranks, key=[TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                       TrialState.FAILED].index)
    assert info.best_trial is not None and info.best_trial.value == max(values)


@pytest.mark.parametrize("search,seed", [("random", 7), ("bayes", 11)])
def test_sweep_prunes_ranks_and_pulls_the_best(client: Client, server: Server, tmp_path: Path,
                                               search: str, seed: int) -> None:
    sweep = client.sweep(sweep_dict(search, seed))
    assert sweep.id.startswith("s-")
    info = sweep.wait(timeout=SWEEP_TIMEOUT_S)
    check_leaderboard(info)
    pruned = 0
    for t in info.trials:
        job_info = client.get_job(t.job_id)  # every trial is an ordinary job, in `gradhub status`
        assert job_info.name == f"{sweep.id}-t{t.number}"
        assert job_info.spec["optimizer"]["lr"] == pytest.approx(t.params["optimizer.lr"])
        assert job_info.spec["model"]["args"]["hidden"] == t.params["model.args.hidden"]
        if t.state is TrialState.COMPLETE:
            assert job_info.state == JobState.SUCCEEDED and job_info.step == STEPS
            assert t.value == pytest.approx(job_info.metrics["val_accuracy"])
        elif t.state is TrialState.PRUNED:
            pruned += 1
            assert job_info.state == JobState.CANCELLED and "pruned by sweep" in job_info.reason
            # pruned at an evaluation before its last step; the job may train a few more steps
            # (up to the last) before the cancel lands, and ends CANCELLED all the same
            at = re.search(r"at step (\d+) is behind", t.reason)
            assert at and int(at.group(1)) < STEPS, f"a pruned trial is pruned before its last step: {t.reason}"
            assert t.step == job_info.step <= STEPS
            assert t.evaluations >= 1
    print(f"{search}: {pruned} of {TRIALS} trials pruned")

    best = info.best_trial
    assert best is not None
    trial, meta = client.pull_best(sweep.id, tmp_path / "best.safetensors")
    assert trial.number == best.number and meta.step == STEPS
    accuracy = evaluate_checkpoint(tmp_path / "best.safetensors", best.params["model.args.hidden"])
    assert accuracy == pytest.approx(best.value, abs=1e-6)
    assert pruned, "the seeds draw learning rates low enough for the median rule to stop some trials"


def test_cli_sweep_status_and_pull_best(server: Server, tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({**job(), "steps": 20}))
    sweep = {"base": "job.yaml", "search": "grid", "space": {"optimizer.lr": {"choice": [0.01, 0.003]}},
             "objective": {"metric": "val_accuracy", "mode": "max"}, "parallel": 2}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", str(tmp_path / "sweep.yaml"), "--wait", "--timeout", "180",
                                 "--server", server.address])
    assert result.exit_code == 0, result.output
    sweep_id = result.output.splitlines()[0]
    assert sweep_id.startswith("s-")
    assert "best trial" in result.output.splitlines()[-1]

    result = runner.invoke(app, ["status", sweep_id, "--json", "--server", server.address])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["state"] == "SUCCEEDED" and len(data["trials"]) == 2
    assert data["best_trial"]["metrics"]["val_accuracy"] == data["best_trial"]["value"]
    assert data["trials"][0]["number"] == data["best"]

    result = runner.invoke(app, ["status", sweep_id, "--server", server.address])
    assert result.exit_code == 0 and "optimizer.lr" in result.output and sweep_id in result.output

    out = tmp_path / "best.safetensors"
    result = runner.invoke(app, ["pull", sweep_id, "--best", "-o", str(out), "--server", server.address])
    assert result.exit_code == 0, result.output
    assert out.exists() and "(verified)" in result.output

    result = runner.invoke(app, ["pull", sweep_id, "-o", str(out), "--server", server.address])
    assert result.exit_code == 2 and "--best" in result.output


def test_a_bad_sweep_is_refused_naming_the_field(client: Client) -> None:
    bad = {**sweep_dict("random", 0), "space": {"optimizer.lrr": {"uniform": [0.1, 0.2]}}}
    with pytest.raises(SpecError, match=r"^space\.optimizer\.lrr: "):
        client.sweep(bad)
    too_big = {**sweep_dict("random", 0), "job": {**job(), "resources": {"cpus": 64}}}
    with pytest.raises(SpecError, match="resources"):
        client.sweep(too_big)
    assert all(s.state != SweepState.RUNNING for s in client.list_sweeps())
