"""The SweepService is a user service like the JobService: no call without a known token, a
sweep's trials are jobs of its submitter, only the owner (or an admin) cancels it or pulls its
best trial, and a viewer only reads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gradhub.client.client import Client
from gradhub.proto.contract.errors import AuthError, PermissionDeniedError
from gradhub.proto.contract.states import JobState
from gradhub.proto.contract.sweep import SweepState
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig

from ..conftest import wait_for

TOKENS = {name: f"{name}-token-{'y' * 16}" for name in ("alice", "bob", "carol")}


@pytest.fixture(scope="module")
def server(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("sweep-users")
    (folder / "tokens.yaml").write_text(f"""
users:
  - {{name: alice, token: "{TOKENS['alice']}", role: user}}
  - {{name: bob, token: "{TOKENS['bob']}", role: user}}
  - {{name: carol, token: "{TOKENS['carol']}", role: viewer}}
""")
    with Server(ServerConfig(port=0, data_dir=folder / "data", tokens_file=folder / "tokens.yaml")) as s:
        yield s


def test_sweeps_need_a_token_and_their_owner(server: Server) -> None:
    sweep = {"job": {"workers": 1, "resources": {"cpus": 0.25}, "model": {"name": "mlp", "args": {"hidden": [8]}},
                     "dataset": "digits", "steps": 100_000},
             "search": "random", "space": {"optimizer.lr": {"loguniform": [1e-3, 1e-1]}},
             "objective": {"metric": "val_accuracy", "mode": "max"}, "trials": 2}
    with Client(server.address) as nobody, pytest.raises(AuthError):
        nobody.list_sweeps()
    with Client(server.address, token=TOKENS["alice"]) as alice, \
            Client(server.address, token=TOKENS["bob"]) as bob, \
            Client(server.address, token=TOKENS["carol"]) as carol:
        with pytest.raises(PermissionDeniedError, match="viewer"):
            carol.sweep(sweep)
        handle = alice.sweep(sweep)
        assert handle.info.owner == "alice"
        trial = handle.info.trials[0]
        assert bob.get_job(trial.job_id).owner == "alice"
        assert carol.get_sweep(handle.id).id == handle.id  # everyone reads
        with pytest.raises(PermissionDeniedError, match="their own"):
            bob.cancel_sweep(handle.id)
        wait_for(lambda: alice.get_job(trial.job_id).state == JobState.RUNNING, 60, "the trial's job to run")
        done = alice.cancel_sweep(handle.id)
        assert done.state is SweepState.CANCELLED
        wait_for(lambda: alice.get_job(trial.job_id).state == JobState.CANCELLED, 60, "the trial's job to stop")
        assert "cancelled" in alice.get_job(trial.job_id).reason
