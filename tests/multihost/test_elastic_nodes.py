"""An elastic job across the compose topology (``running_cluster``: a head and two worker hosts,
each in a network namespace of its own, one CPU each): one worker host is killed mid-job and the
job goes on, on the other host, instead of failing; the host is started again and the job grows
back onto it. The job is ps-sync with ``workers: {min: 1, max: 2}``: it keeps its global batch
through both changes, so it still ends with single-process PyTorch's parameters. With
``ps_shards: 2`` a shard runs on each worker host: the host that dies takes a shard with it, so
every shard and worker starts again from the latest checkpoint, on the job's smallest size.

The job's dataset holds it at two steps (a sample that waits for a file, as in
tests/integration/test_elastic.py), so the host dies while step ``DOWN_AT`` is in flight and the
job grows back at the boundary after step ``UP_AT``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from gradhub.client.client import Client, JobInfo

from ..integration.test_elastic import first_read
from ..integration.test_exactness import OPTIMIZERS, SEED, STEPS, reference
from .netns import check_prerequisites
from .test_compose_topology import HOST_LABEL, SERVER, WORKER_IPS, running_cluster

pytestmark = pytest.mark.multihost

USER_CODE = Path(__file__).parents[1] / "integration" / "user_code"
BATCH, LARGEST = 16, 2
DOWN_AT, UP_AT = 10, 20
WAIT_S = 180.0


def _spec(gates: dict[int, Path], shards: int) -> dict:
    return {"name": "elastic-nodes", "mode": "ps-sync", "workers": {"min": 1, "max": LARGEST}, "ps_shards": shards,
            "checkpoint_every": 5,
            "resources": {"cpus": 1}, "model": {"name": "mlp", "args": {"hidden": [32]}},
            "dataset": {"factory": "gh_zoo:gated_digits", "args": {"gates": {str(k): str(v) for k, v in gates.items()}}},
            "working_dir": str(USER_CODE), "optimizer": OPTIMIZERS["adam"], "batch_size": BATCH, "steps": STEPS,
            "seed": SEED, "max_restarts": 3}


def _wait(client: Client, job_id: str, what: str, ok) -> JobInfo:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while True:
        info = client.get_job(job_id)
        if ok(info):
            return info
        if info.state not in ("QUEUED", "RUNNING"):
            pytest.fail(f"the job ended {info.state} ({info.reason}) while waiting for {what}; its log:\n"
                        + "\n".join(client.logs(job_id)))
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_S:.0f} s waiting for {what}: {info}; its log:\n"
                        + "\n".join(client.logs(job_id)))
        time.sleep(0.2)


def _ips(info: JobInfo) -> dict[int, str]:
    """Each running worker's host address (the server names a worker "hostname (ip)")."""
    out = {}
    for w in info.workers:
        m = HOST_LABEL.search(w.host)
        if w.state == "running" and m:
            out[w.rank] = m.group("ip")
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("shards", [1, 2], ids=["one-store", "2-shards"])
def test_an_elastic_job_outlives_a_worker_host_and_grows_back_onto_it(tmp_path: Path, shards: int) -> None:
    problem = check_prerequisites()
    if problem is not None:
        pytest.fail(problem)  # selected with -m multihost: a run that cannot happen is a failure
    down, up = tmp_path / "down", tmp_path / "up"
    gates = {first_read(DOWN_AT, 0, LARGEST * BATCH, LARGEST): down, first_read(UP_AT, 0, LARGEST * BATCH, LARGEST): up}
    with running_cluster(tmp_path) as cluster, Client(SERVER, token=cluster.token) as client:
        job = client.submit(_spec(gates, shards))

        def at_down(i: JobInfo) -> bool:  # (with shards: the checkpoint at DOWN_AT written, which they go back to)
            return i.step >= DOWN_AT and sorted(_ips(i).values()) == sorted(WORKER_IPS) and (
                shards == 1 or DOWN_AT in [c.step for c in client.list_checkpoints(job.id)])

        info = _wait(client, job.id, f"step {DOWN_AT} on both hosts", at_down)
        assert info.size == LARGEST

        lost = cluster.workers[1]
        cluster.net.kill_host(lost)  # every process of that host: its Ray node and the worker on it
        died = time.monotonic()
        info = _wait(client, job.id, "the job to go on without the lost host", lambda i: i.size == 1)
        print(f"the job shrank {time.monotonic() - died:.1f} s after the host was killed")
        down.touch()
        info = _wait(client, job.id, f"step {UP_AT} on one host",
                     lambda i: i.step >= UP_AT and list(_ips(i).values()) == [WORKER_IPS[0]])

        cluster.start_worker(lost)
        back = time.monotonic()
        info = _wait(client, job.id, "a worker on the host that came back",
                     lambda i: sorted(_ips(i).values()) == sorted(WORKER_IPS))
        print(f"a worker registered on the host {time.monotonic() - back:.1f} s after it was started again")
        up.touch()
        info = job.wait(timeout=WAIT_S)
        logs = "\n".join(client.logs(info.id))
        assert info.state == "SUCCEEDED", (info.reason, logs)
        if shards == 1:
            assert logs.count(" died ") == 1 and "the job goes on without it" in logs, logs
        else:  # (the worker's death may be seen before the shard's: a restart of its own)
            assert re.search(r"parameter-server shard \d died; every shard and worker starts again from the latest "
                             r"checkpoint \(restart \d of 3\)", logs), logs
            assert f"every shard starts again from the checkpoint at step {DOWN_AT}" in logs, logs
        assert f"size: 1 workers from step {DOWN_AT}" in logs, logs
        assert f"size: {LARGEST} workers from step {UP_AT + 1}" in logs, logs
        path = tmp_path / "final.safetensors"
        client.pull_checkpoint(info.id, path)

    from safetensors.torch import load_file

    got, expected = load_file(path), reference(LARGEST, OPTIMIZERS["adam"])
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-5, f"max |gradhub - pytorch| = {worst:.3g} after losing a host and growing back"
