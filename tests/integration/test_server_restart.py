"""Jobs survive a server restart.

The server runs in a process of its own (with its own embedded Ray), in a new session so that
it, its Ray and Ray's workers form one process group. It is SIGKILLed while two ps-sync jobs
run: one that has written a checkpoint and is past it, and one that has none yet. A new server
on the same data dir (and the same port) lists both, resumes the first from its checkpoint and
restarts the second from step 0; both end SUCCEEDED with the parameters of an undisturbed run
(ps-sync and allreduce are deterministic and the checkpoint holds the optimizer's state). No
process of the killed server's Ray may outlive it. The same test runs in both modes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from gradhub.client.client import Client, JobInfo

from ..conftest import final_params, wait_for
from ..server_process import ServerProcess, assert_nothing_left

CKPT_EVERY = 50
STEPS = {"ps-sync": 400, "allreduce": 800}  # the kill lands at about step 60 (the first checkpoint: 50)


def spec(name: str, checkpoint_every: int, mode: str) -> dict:
    return {
        "name": name, "mode": mode, "workers": 2, "resources": {"cpus": 0.25},
        "model": {"name": "mlp", "args": {"hidden": [128, 128]}}, "dataset": "digits",
        "optimizer": {"name": "adam", "lr": 0.001}, "batch_size": 16, "steps": STEPS[mode], "seed": 5,
        "checkpoint_every": checkpoint_every,
    }


@pytest.mark.timeout(420)
# allreduce is `slow`: tests/fault/test_chaos.py's short run (`long`, CI's second pass) kills the server
# under an allreduce job too and checks its parameters against the undisturbed run's
@pytest.mark.parametrize("mode", ["ps-sync", pytest.param("allreduce", marks=pytest.mark.slow)])
def test_jobs_survive_a_server_kill(tmp_path: Path, mode: str) -> None:
    data = tmp_path / "data"
    first = ServerProcess(data, tmp_path, "first")
    second = ServerProcess(data, tmp_path, "second")
    try:
        first.start()
        with Client(first.address) as client:
            ckpt_job = client.submit(spec("with-checkpoint", CKPT_EVERY, mode)).id
            bare_job = client.submit(spec("no-checkpoint", 0, mode)).id

            def ready_to_kill() -> bool:
                a, b = client.get_job(ckpt_job), client.get_job(bare_job)
                for info in (a, b):
                    assert info.state in ("QUEUED", "RUNNING"), f"{info.name} ended early: {info.reason}"
                ckpts = client.list_checkpoints(ckpt_job)
                return (a.state == b.state == "RUNNING" and bool(ckpts)
                        and a.step > ckpts[-1].step and b.step > 0)

            wait_for(ready_to_kill, 120, "a checkpoint of one job, both jobs running", interval=0.01)
            # the moment just before the kill
            before = {j: client.get_job(j) for j in (ckpt_job, bare_job)}
            worker_pids = {w.pid for info in before.values() for w in info.workers if w.pid > 0}
            checkpointed = client.list_checkpoints(ckpt_job)[-1].step
            assert not client.list_checkpoints(bare_job)
            first.members()
            assert len(worker_pids) == 4 and worker_pids <= set(first.seen), (worker_pids, first.seen)
            first.kill()
        assert_nothing_left(first, worker_pids)
        for info in before.values():
            assert info.step < STEPS[mode], f"{info.name} must be killed before its end, was at {info.step}"

        second.start(port=first.port)  # the same address, as a restarted service would have
        with Client(second.address) as client:
            listed = {j.id: j for j in client.list_jobs()}
            assert {ckpt_job, bare_job} <= listed.keys()
            for job_id in (ckpt_job, bare_job):
                assert listed[job_id].state in ("QUEUED", "RUNNING"), listed[job_id]
            undisturbed = client.submit(spec("undisturbed", 0, mode))
            finished: dict[str, JobInfo] = {}
            for job_id in (ckpt_job, bare_job, undisturbed.id):
                finished[job_id] = client.job(job_id).wait(timeout=180)

            logs = {j: "\n".join(client.logs(j)) for j in (ckpt_job, bare_job)}
            assert "server restarted" in logs[ckpt_job]
            resumed = re.findall(r"resuming from the checkpoint at step (\d+)", logs[ckpt_job])
            assert len(resumed) == 1, logs[ckpt_job]
            step = int(resumed[0])
            assert checkpointed <= step < STEPS[mode] and step % CKPT_EVERY == 0, (checkpointed, step)
            assert "server restarted" in logs[bare_job]
            assert "no checkpoint yet: restarting from step 0" in logs[bare_job], logs[bare_job]

            expected = final_params(client, finished[undisturbed.id], tmp_path)
            for job_id in (ckpt_job, bare_job):
                info = finished[job_id]
                assert info.state == "SUCCEEDED" and info.step == info.version == STEPS[mode], info
                got = final_params(client, info, tmp_path)
                worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
                assert worst <= 1e-6, f"{info.name} differs from the undisturbed run by {worst:.3g}"
            second.members()
    finally:
        second.kill()
        first.kill()
    assert_nothing_left(second)


def test_a_second_server_on_the_same_data_dir_refuses_to_start(server):
    from gradhub.proto.contract.errors import StateError
    from gradhub.server.app import Server as SecondServer
    from gradhub.server.config import ServerConfig as Config

    second = SecondServer(Config(port=0, data_dir=server.config.data_dir))
    with pytest.raises(StateError, match=f"is in use by the gradhub server pid {os.getpid()} .* at .*:{server.port}"):
        second.start()
    assert second.port == 0  # it stopped before binding a port or touching the jobs
