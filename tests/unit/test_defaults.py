"""One source for every default: the server's live in ServerConfig (the CLI and the job manager
read them from there), and the Client reads the environment only in ``from_env``."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest

from gradhub.client import cli
from gradhub.client.client import DEFAULT_ADDRESS, Client
from gradhub.server.config import ServerConfig

# `gradhub server` option -> ServerConfig field
OPTIONS = {"host": "host", "port": "port", "data_dir": "data_dir", "grace": "stop_grace_s",
           "node_join_grace": "node_join_grace_s", "collective_timeout": "collective_timeout_s"}


def test_the_server_command_takes_its_defaults_from_server_config() -> None:
    params = inspect.signature(cli.server).parameters
    defaults = {f.name: f.default for f in fields(ServerConfig)}
    for option, field in OPTIONS.items():
        assert params[option].default == defaults[field], option


def test_the_job_manager_takes_the_server_config(tmp_path) -> None:
    from gradhub.server.checkpoints import CheckpointStore
    from gradhub.server.job_db import JobDB
    from gradhub.server.jobs import JobManager
    from gradhub.server.launcher import ExternalLauncher

    with JobDB(tmp_path / "jobs.db") as db:
        def manager(config: ServerConfig | None) -> JobManager:
            return JobManager(db, CheckpointStore(tmp_path / "c"), ExternalLauncher({"CPU": 1.0}), tmp_path, config)

        given = ServerConfig(heartbeat_interval_s=0.5, heartbeat_timeout_s=2.0, collective_timeout_s=9.0)
        m = manager(given)
        assert m.config is given and (m.heartbeat_interval_s, m.collective_timeout_s) == (0.5, 9.0)
        assert manager(None).config == ServerConfig()  # its defaults are ServerConfig's


def test_client_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADHUB_SERVER", "elsewhere:1")
    monkeypatch.setenv("GRADHUB_TOKEN", "t0ken")
    with Client("here:2") as client:
        assert client.address == "here:2" and client._metadata is None
    with Client.from_env() as client:
        assert client.address == "elsewhere:1" and client._metadata == (("authorization", "Bearer t0ken"),)
    with Client.from_env("given:3", token="mine") as client:
        assert client.address == "given:3" and client._metadata == (("authorization", "Bearer mine"),)
    monkeypatch.delenv("GRADHUB_SERVER")
    monkeypatch.setenv("GRADHUB_TOKEN", "")
    with Client.from_env() as client:
        assert client.address == DEFAULT_ADDRESS and client._metadata is None


def test_server_config_validates_the_new_knobs() -> None:
    with pytest.raises(ValueError, match="poll_s"):
        ServerConfig(poll_s=0)
    with pytest.raises(ValueError, match="stop_grace_s"):
        ServerConfig(stop_grace_s=-1)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "head"])
def test_a_server_beyond_loopback_needs_a_token_or_insecure(host: str) -> None:
    with pytest.raises(ValueError, match="refusing to listen on .* without one.*--insecure"):
        ServerConfig(host=host)
    assert ServerConfig(host=host, token="t").token == "t"
    assert ServerConfig(host=host, insecure=True).insecure


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_a_loopback_server_runs_without_a_token(host: str) -> None:
    assert ServerConfig(host=host).token is None
