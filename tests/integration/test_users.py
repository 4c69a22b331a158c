"""A server with users (``--tokens-file``), on a real local Ray: each job records its owner;
users see every job but cancel, delete and pull only their own; admins act on all; viewers
only read; a user's job over their quota waits QUEUED with a reason that says so, without
holding up other users' jobs, and starts when the user's running jobs end. Workers need no
user token (they carry their job's credential), so jobs of every user run to the end.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from gradhub.client.client import Client
from gradhub.proto.contract.errors import AuthError, PermissionDeniedError, ResourceExhaustedError
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig

from ..conftest import final_params, wait_for

TOKENS = {name: f"{name}-token-{'x' * 16}" for name in ("root", "alice", "bob", "carol")}
QUOTA_CPUS = 0.5


def spec(name: str, steps: int = 100_000, cpus: float = 0.25, workers: int = 1) -> dict:
    return {"name": name, "workers": workers, "resources": {"cpus": cpus}, "model": {"name": "mlp",
            "args": {"hidden": [16]}}, "dataset": "digits", "batch_size": 32, "steps": steps, "eval_every": 0}


@pytest.fixture(scope="module")
def server(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("users")
    root_hash = hashlib.sha256(TOKENS["root"].encode()).hexdigest()
    (folder / "tokens.yaml").write_text(f"""
users:
  - {{name: root, token_sha256: "{root_hash}", role: admin}}
  - {{name: alice, token: "{TOKENS['alice']}", role: user, quota: {{cpus: {QUOTA_CPUS}}}}}
  - {{name: bob, token: "{TOKENS['bob']}", role: user}}
  - {{name: carol, token: "{TOKENS['carol']}", role: viewer}}
""")
    config = ServerConfig(port=0, data_dir=folder / "data", tokens_file=folder / "tokens.yaml")
    with Server(config) as s:
        yield s


def as_user(server: Server, name: str) -> Client:
    return Client(server.address, token=TOKENS[name])


def test_a_token_that_is_no_ones_is_refused(server):
    for token in ("", "alice-token", TOKENS["alice"] + "x"):
        with Client(server.address, token=token) as client, pytest.raises(AuthError, match="bearer token"):
            client.list_jobs()


@pytest.mark.timeout(180)
def test_owners_roles_and_a_finished_job_of_each_user(server, tmp_path):
    with as_user(server, "alice") as alice, as_user(server, "bob") as bob, as_user(server, "carol") as carol, \
            as_user(server, "root") as root:
        done = alice.submit(spec("alice-short", steps=20)).wait(timeout=120)
        assert done.state == "SUCCEEDED", done.reason  # her workers needed no user token
        assert done.owner == "alice"
        running = bob.submit(spec("bob-long"))
        assert running.info.owner == "bob"

        for who in (alice, bob, carol, root):  # everyone sees every job, with its owner
            owners = {j.id: j.owner for j in who.list_jobs()}
            assert owners[done.id] == "alice" and owners[running.id] == "bob"
            assert who.get_job(running.id).owner == "bob"
            assert who.list_checkpoints(done.id)

        with pytest.raises(PermissionDeniedError, match="carol \\(viewer\\) is a viewer"):
            carol.submit(spec("carol"))
        with pytest.raises(PermissionDeniedError, match="alice \\(user\\) may cancel only their own jobs; this one "
                                                        "belongs to bob"):
            alice.cancel(running.id)
        with pytest.raises(PermissionDeniedError, match="may pull only their own"):
            bob.pull_checkpoint(done.id, tmp_path / "stolen.safetensors")
        assert not (tmp_path / "stolen.safetensors").exists()
        with pytest.raises(PermissionDeniedError, match="may delete only their own"):
            bob.delete(done.id)
        with pytest.raises(PermissionDeniedError, match="viewer"):
            carol.cancel(running.id)
        assert bob.get_job(running.id).state in ("QUEUED", "RUNNING"), "nobody else could cancel it"

        assert final_params(alice, done, tmp_path)  # the owner pulls her checkpoint
        assert root.cancel(running.id).id == running.id  # an admin acts on anyone's job
        wait_for(lambda: root.get_job(running.id).done, 60, "bob's job to end")
        root.delete(done.id)
        assert done.id not in {j.id for j in bob.list_jobs()}


@pytest.mark.timeout(180)
def test_a_job_over_its_owners_quota_waits_without_holding_up_others(server):
    with as_user(server, "alice") as alice, as_user(server, "bob") as bob:
        with pytest.raises(ResourceExhaustedError, match="quota: the job needs 1 CPUs, over the quota of 0.5"):
            alice.submit(spec("never", cpus=0.5, workers=2))

        first = alice.submit(spec("alice-1", cpus=QUOTA_CPUS))
        wait_for(lambda: alice.get_job(first.id).state == "RUNNING", 60, "alice's first job to run")
        second = alice.submit(spec("alice-2", cpus=0.25))
        wait_for(lambda: "over the quota of alice" in alice.get_job(second.id).reason, 30,
                 "alice's second job to say why it waits")
        info = alice.get_job(second.id)
        assert info.state == "QUEUED"
        assert "CPUs 0.5 of 0.5 in use by running jobs, this job needs 0.25" in info.reason, info.reason

        other = bob.submit(spec("bob-meanwhile", cpus=0.25))  # queued after hers, runs before it
        wait_for(lambda: bob.get_job(other.id).state == "RUNNING", 60, "bob's job to run past alice's waiting one")
        assert alice.get_job(second.id).state == "QUEUED"

        alice.cancel(first.id)
        wait_for(lambda: alice.get_job(second.id).state == "RUNNING", 60, "alice's second job to start")
        assert alice.get_job(second.id).reason == ""
        for job in (second, other):
            (alice if job is second else bob).cancel(job.id)
        wait_for(lambda: all(alice.get_job(j.id).done for j in (first, second, other)), 60, "the jobs to end")
