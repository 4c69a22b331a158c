"""A worker whose process is killed does not change the result (ps-sync).

Worker 1 of 3 is SIGKILLed once it reaches a chosen step; Ray restarts the actor, it
re-registers, pulls the parameters and the job's buffers, resumes at the step the server says
and recomputes the gradient it owed, with the same dropout mask (randomness is seeded per
(seed, rank, step)). The model has BatchNorm and dropout. The final state must equal an
undisturbed run of the same spec (<= 1e-6).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from gradhub.client.client import Client

from ..conftest import final_params, wait_for

KILL_RANK, KILL_AT = 1, 40
USER_CODE = Path(__file__).parents[1] / "integration" / "user_code"


def spec(name: str) -> dict:
    return {
        "name": name, "mode": "ps-sync", "workers": 3, "resources": {"cpus": 0.5},
        "model": {"factory": "gh_zoo:bn_net", "args": {"hidden": 256, "p": 0.2}}, "dataset": "digits",
        "working_dir": str(USER_CODE),
        "optimizer": {"name": "adam", "lr": 0.001}, "batch_size": 16, "steps": 400, "seed": 3,
        "max_restarts": 1,  # one kill is one death: max_restarts 1 survives it
    }


@pytest.mark.timeout(400)
def test_killed_worker_is_restarted_and_the_result_is_unchanged(server, tmp_path):
    with Client(server.address) as client:
        undisturbed = client.submit(spec("undisturbed")).wait(timeout=180)
        job = client.submit(spec("killed"))

        def reached() -> bool:
            info = client.get_job(job.id)
            assert info.state in ("QUEUED", "RUNNING"), f"job ended early: {info.state} {info.reason}"
            w = info.workers[KILL_RANK] if len(info.workers) > KILL_RANK else None
            return w is not None and w.pid > 0 and w.step >= KILL_AT

        wait_for(reached, timeout=120, what=f"worker {KILL_RANK} to reach step {KILL_AT}", interval=0.005)
        victim = client.get_job(job.id).workers[KILL_RANK]
        os.kill(victim.pid, signal.SIGKILL)

        info = job.wait(timeout=180)
        assert info.state == "SUCCEEDED", info.reason
        assert victim.step < info.total_steps, "the kill must land before the job's end"
        logs = "\n".join(client.logs(job.id))
        assert f"worker {KILL_RANK} died" in logs and "restart 1 of 1" in logs
        # the rerun that reaches the actor while Ray is still restarting it is the same death
        assert logs.count("died") == 1, logs

        expected = final_params(client, undisturbed, tmp_path)
        got = final_params(client, info, tmp_path)
        worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
        assert worst <= 1e-6, f"killed run differs from the undisturbed run by {worst:.3g}"
        assert info.version == undisturbed.version == 400
