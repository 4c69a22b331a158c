"""A lost worker never hangs an allreduce job: only the lost worker is restarted, the survivors
keep their processes and their state, and the group re-forms from the survivors' live state at
the step in flight (same final parameters as an undisturbed run); past ``max_restarts`` the job
ends FAILED naming the dead worker; in bounded time either way.

Failures are injected at a chosen (rank, step) by the job's own model (shipped in its
working_dir): at that step's forward pass, rank ``fail_rank`` sends itself ``SIGKILL`` (a
death) or ``SIGSTOP`` (a hang: the process stays, its heartbeats stop). A marker file makes
it fire once, so the restarted group runs through.
"""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gradhub.client.client import Client
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig

from ..conftest import final_params, wait_for

PACKAGE = "gh_fault_inject"
MODULE = textwrap.dedent('''
    import os
    import signal

    import torch.distributed as dist

    from gradhub.worker.models import mlp


    def model(fail_rank, fail_at, marker, sig="SIGKILL", **mlp_args):
        """The built-in mlp (same parameters, same names) that fails once at (rank, step)."""
        net = mlp(**mlp_args)
        forwards = [0]

        def maybe_fail(module, inputs):
            if not module.training or not dist.is_initialized() or dist.get_rank() != fail_rank:
                return
            forwards[0] += 1  # training forwards of this process: step + 1 on the first run
            if forwards[0] == fail_at + 1 and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), getattr(signal, sig))

        net.register_forward_pre_hook(maybe_fail)
        return net
''')

WORKERS, STEPS, EVERY, FAIL_RANK = 2, 200, 20, 1
MODEL_ARGS = {"hidden": [64]}
ENDS_WITHIN_S = 60  # from the failure to the job's end (or its restart's end)


def spec(name: str, **extra) -> dict:
    return {
        "name": name, "mode": "allreduce", "workers": WORKERS, "resources": {"cpus": 0.5},
        "model": {"name": "mlp", "args": MODEL_ARGS}, "dataset": "digits",
        "optimizer": {"name": "adam", "lr": 0.002}, "batch_size": 16, "steps": STEPS, "seed": 5,
        "checkpoint_every": EVERY, "keep_checkpoints": 20, **extra,
    }


def faulty(name: str, code: Path, marker: Path, fail_at: int, sig: str = "SIGKILL", **extra) -> dict:
    args = {"fail_rank": FAIL_RANK, "fail_at": fail_at, "marker": str(marker), "sig": sig, **MODEL_ARGS}
    return spec(name, working_dir=str(code), model={"factory": f"{PACKAGE}:model", "args": args}, **extra)


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault-code")
    (root / PACKAGE).mkdir()
    (root / PACKAGE / "__init__.py").write_text(MODULE)
    return root


@pytest.fixture(scope="module")
def undisturbed(server, tmp_path_factory):
    with Client(server.address) as client:
        info = client.submit(spec("undisturbed")).wait(timeout=180)
        return info, final_params(client, info, tmp_path_factory.mktemp("undisturbed"))


def _ended_after_failure(client: Client, job_id: str, marker: Path) -> tuple[str, float]:
    """Wait for the failure, then for the job's end; returns (state, seconds in between)."""
    wait_for(marker.exists, timeout=120, what=f"worker {FAIL_RANK} to reach its failure step")
    failed_at = time.monotonic()
    wait_for(lambda: client.get_job(job_id).state in ("SUCCEEDED", "FAILED", "CANCELLED"),
             timeout=ENDS_WITHIN_S, what=f"the job to end within {ENDS_WITHIN_S} s of the failure")
    return client.get_job(job_id).state, time.monotonic() - failed_at


@pytest.mark.timeout(300)
def test_a_killed_worker_rejoins_the_survivors_live_state(server, code, undisturbed, tmp_path):
    expected_info, expected = undisturbed
    marker = tmp_path / "fired"
    with Client(server.address) as client:
        job = client.submit(faulty("killed", code, marker, fail_at=70, max_restarts=1))
        wait_for(marker.exists, timeout=120, what=f"worker {FAIL_RANK} to reach its failure step")
        survivor = next(w for w in client.get_job(job.id).workers if w.rank != FAIL_RANK)
        state, _ = _ended_after_failure(client, job.id, marker)
        info = client.get_job(job.id)
        assert state == "SUCCEEDED", info.reason
        logs = "\n".join(client.logs(job.id))
        assert re.search(rf"worker {FAIL_RANK} died \(.*\); restart 1 of 1", logs), logs
        assert "restarting all" not in logs, logs
        # the survivor lost its peer in the all-reduce of the step in flight (the 71st training
        # forward of the dead worker, counting its probe for unused parameters: step 69): the
        # group goes on from there, with the survivor's state, not the checkpoint of step 60
        formed = re.search(rf"group 2 formed: {WORKERS} workers go on from step (\d+), with the live state "
                           "of worker 0", logs)
        assert formed and int(formed[1]) == 69, logs
        assert info.step == info.version == STEPS
        assert survivor.pid and survivor.restarts == 0
        got = final_params(client, info, tmp_path)
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-6, f"restarted run differs from the undisturbed run by {worst:.3g}"
    assert expected_info.state == "SUCCEEDED"


@pytest.mark.timeout(300)
def test_past_max_restarts_the_job_fails_naming_the_dead_worker(server, code, tmp_path):
    marker = tmp_path / "fired"
    with Client(server.address) as client:
        job = client.submit(faulty("no-restarts", code, marker, fail_at=30, max_restarts=0))
        state, seconds = _ended_after_failure(client, job.id, marker)
        info = client.get_job(job.id)
    assert state == "FAILED"
    assert info.reason.startswith(f"worker {FAIL_RANK} died"), info.reason
    assert "max_restarts is 0" in info.reason, info.reason
    assert seconds < ENDS_WITHIN_S


@pytest.fixture(scope="module")
def watchful_server(ray_session: None, tmp_path_factory) -> Iterator[Server]:
    """A server that gives up on a silent worker after 3 s (instead of 20)."""
    config = ServerConfig(port=0, data_dir=tmp_path_factory.mktemp("watchful"),
                          heartbeat_interval_s=0.5, heartbeat_timeout_s=3.0)
    with Server(config) as s:
        yield s


@pytest.mark.timeout(300)
def test_a_hung_worker_is_found_by_its_heartbeat_and_restarted(watchful_server, code, undisturbed, tmp_path):
    """SIGSTOP: the process lives on and its peer waits in the all-reduce; the server notices
    the silence and kills the worker, Ray restarts it, and the group re-forms instead of
    waiting out a timeout."""
    _, expected = undisturbed
    marker = tmp_path / "fired"
    with Client(watchful_server.address) as client:
        job = client.submit(faulty("hung", code, marker, fail_at=50, sig="SIGSTOP", max_restarts=1))
        state, _ = _ended_after_failure(client, job.id, marker)
        info = client.get_job(job.id)
        assert state == "SUCCEEDED", info.reason
        logs = "\n".join(client.logs(job.id))
        assert f"worker {FAIL_RANK} silent for" in logs and "restart 1 of 1" in logs, logs
        assert "group 2 formed: 2 workers go on from step 49, with the live state of worker 0" in logs, logs
        got = final_params(client, info, tmp_path)
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-6, f"restarted run differs from the undisturbed run by {worst:.3g}"
