"""A sweep survives a server kill: the server (in a process of its own, with its own Ray) is
SIGKILLed while the sweep's second trial runs; a new server on the same data dir resumes the
sweep, takes up the running trial's job (requeued by the job manager, not started again), runs
the rest, and ends with each point of the grid tried exactly once. About 40 s (two server starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradhub.client.client import Client
from gradhub.client.sweeps import Sweep
from gradhub.proto.contract.sweep import SweepState, TrialState

from ..conftest import wait_for
from ..server_process import ServerProcess, assert_nothing_left

STEPS = 600


@pytest.mark.long  # the default suite kills a server under a job in test_server_restart
@pytest.mark.timeout(420)
def test_a_sweep_survives_a_server_kill(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first, second = ServerProcess(data, tmp_path, "first"), ServerProcess(data, tmp_path, "second")
    job = {"name": "digits", "workers": 1, "resources": {"cpus": 0.5}, "model": {"name": "mlp", "args": {"hidden": [32]}},
           "dataset": "digits", "optimizer": "adam", "batch_size": 32, "steps": STEPS, "eval_every": 50,
           "checkpoint_every": 100}
    sweep = {"job": job, "search": "grid", "space": {"optimizer.lr": {"choice": [0.01, 0.003, 0.001]}},
             "objective": {"metric": "val_accuracy", "mode": "max"}, "parallel": 1, "prune": "none"}
    try:
        first.start()
        with Client(first.address) as client:
            sweep_id = client.sweep(sweep).id

            def second_trial_running() -> bool:
                trials = client.get_sweep(sweep_id).trials
                return len(trials) == 2 and any(t.state is TrialState.RUNNING and t.step > 0 for t in trials)

            wait_for(second_trial_running, 180, "the second trial to run", interval=0.05)
            running_job = next(t.job_id for t in client.get_sweep(sweep_id).trials if t.state is TrialState.RUNNING)
            first.kill()
        assert_nothing_left(first)

        second.start(port=first.port)
        with Client(second.address) as client:
            info = next(iter(client.watch_sweep(sweep_id, timeout=240)))
            assert info.state is SweepState.RUNNING
            done = Sweep(client, client.get_sweep(sweep_id)).wait(timeout=240)
            assert done.state is SweepState.SUCCEEDED
            assert len(done.trials) == 3 and {t.state for t in done.trials} == {TrialState.COMPLETE}
            assert sorted(t.params["optimizer.lr"] for t in done.trials) == [0.001, 0.003, 0.01]
            assert running_job in {t.job_id for t in done.trials}, "the running trial's job was taken up"
            assert len([j for j in client.list_jobs() if j.name.startswith(sweep_id)]) == 3
            values = [t.value for t in done.trials]
            assert values == sorted(values, reverse=True)
    finally:
        first.kill()
        second.kill()
