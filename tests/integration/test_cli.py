"""The ``gradhub`` command line against a real server on port 0 and a real local Ray.

Commands run in-process through typer's CliRunner. One tiny job (20 steps, 2 workers) is
submitted with ``--wait`` once per module and the other commands look at it; a longer one is
cancelled while it runs. Errors must be one ``error: ...`` line on stderr with exit code 1.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from gradhub.client.cli import app
from gradhub.client.client import Client, JobInfo, WorkerInfo
from gradhub.client.progress import ago, job_details, jobs_table, workers_alive
from gradhub.proto.contract.errors import ServerUnavailableError
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig

HIDDEN = [16]
JOB_YAML = f"""\
name: cli-test
mode: ps-sync
workers: 2
resources: {{cpus: 0.5}}
model: {{name: mlp, args: {{hidden: {HIDDEN}}}}}
dataset: digits
optimizer: {{name: adam, lr: 0.01}}
batch_size: 16
steps: 20
eval_every: 10
"""


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real server; it starts a local Ray unless one is up already (and stops only its own)."""
    with Server(ServerConfig(port=0, data_dir=tmp_path_factory.mktemp("cli-server"))) as s:
        yield s


@pytest.fixture(scope="module")
def env(cli_server: Server) -> dict[str, str | None]:
    return {"GRADHUB_SERVER": cli_server.address, "GRADHUB_TOKEN": None, "COLUMNS": None}


def run(args: list[str], env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(app, args, env=env)


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def finished(env: dict[str, str | None], tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, str]:
    """``gradhub submit job.yaml --wait`` of the tiny job: (its result, the job id)."""
    spec = tmp_path_factory.mktemp("spec") / "job.yaml"
    spec.write_text(JOB_YAML)
    result = run(["submit", str(spec), "--wait", "--timeout", "120"], env)
    return result, result.stdout.splitlines()[0] if result.stdout else ""


# --- submit, status, pull, cancel, logs on a finished job -------------------------------------


def test_submit_wait_succeeds(finished: tuple[Result, str]) -> None:
    result, job_id = finished
    assert result.exit_code == 0, result.output
    assert job_id.startswith("j-")
    final = result.stdout.splitlines()[-1]
    assert final.startswith(f"{job_id} SUCCEEDED: step 20/20") and "val_accuracy" in final


def test_status_table_lists_the_job(finished: tuple[Result, str], env: dict[str, str | None]) -> None:
    _, job_id = finished
    result = run(["status"], env)  # piped: not cut to 80 columns
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if job_id in line)
    assert "SUCCEEDED" in row and "20/20" in row and "0/2" in row and "ago" in row
    narrow = run(["status"], {**env, "COLUMNS": "80"}).stdout  # the id and state stay whole
    assert "SUCCEEDED" in next(line for line in narrow.splitlines() if job_id in line)


def test_status_job_json_has_workers_and_checkpoints(
    finished: tuple[Result, str], env: dict[str, str | None]
) -> None:
    _, job_id = finished
    result = run(["status", job_id, "--json"], env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["id"] == job_id and data["state"] == "SUCCEEDED" and data["step"] == 20
    assert isinstance(data["workers"], list)
    assert [c["step"] for c in data["checkpoints"]] == [20]
    assert len(data["checkpoints"][0]["sha256"]) == 64
    assert data["spec"]["model"] == {"name": "mlp", "args": {"hidden": HIDDEN}}


def test_status_job_details(finished: tuple[Result, str], env: dict[str, str | None]) -> None:
    _, job_id = finished
    result = run(["status", job_id], env)
    assert result.exit_code == 0, result.output
    for fragment in (job_id, "SUCCEEDED", "ps-sync, 2 workers", "mlp {hidden: [16]} on digits",
                     "20/20", "val_accuracy", "checkpoints"):
        assert fragment in result.stdout, result.stdout
    curves = result.stdout.split("curves", 1)[1].splitlines()
    loss = next(line for line in curves if line.strip().startswith("loss"))
    assert any(c in loss for c in "▁▂▃▄▅▆▇█"), loss  # a sparkline of the loss
    assert "accuracy" in result.stdout.split("curves", 1)[1]
    assert "tensorboard --logdir" in result.stdout


def test_top_refreshes_the_job_table_in_place(finished: tuple[Result, str], env: dict[str, str | None]) -> None:
    """`gradhub top`, on a terminal (a pty), draws the table again and again until Ctrl-C
    (SIGINT), then exits cleanly."""
    import os
    import pty
    import select
    import signal
    import subprocess
    import sys

    _, job_id = finished
    child_env = {k: v for k, v in {**os.environ, **env, "COLUMNS": "160"}.items() if v is not None}
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "gradhub.client.cli", "top", "--interval", "0.2"],
                            stdin=terminal, stdout=terminal, stderr=terminal, env=child_env)
    os.close(terminal)

    def read(until: Callable[[bytes], bool], within: float) -> bytes:
        """What it draws until ``until(what it drew)`` or ``within`` seconds: read on, or a
        frame it is writing blocks it on a full terminal (and a Ctrl-C with it)."""
        got, deadline = b"", time.monotonic() + within
        while not until(got) and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.2)[0]:
                try:
                    got += os.read(controller, 65536)
                except OSError:  # its side closed: it exited
                    break
        return got

    try:
        seen = read(lambda got: got.count(job_id.encode()) >= 2, 60)  # drawn twice: refreshed
        proc.send_signal(signal.SIGINT)
        read(lambda _: proc.poll() is not None, 30)
        assert proc.wait(timeout=5) in (0, 130)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    assert seen.count(job_id.encode()) >= 2, seen.decode(errors="replace")[-2000:]


def test_status_watch_of_a_finished_job_returns(
    finished: tuple[Result, str], env: dict[str, str | None]
) -> None:
    _, job_id = finished
    result = run(["status", job_id, "--watch", "--json"], env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["state"] == "SUCCEEDED"


def test_pull_loads_into_the_model(
    finished: tuple[Result, str], env: dict[str, str | None], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from gradhub.worker.models import mlp

    _, job_id = finished
    out = tmp_path / "model.safetensors"
    result = run(["pull", job_id, "-o", str(out)], env)
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout and "step 20" in result.stdout and "sha256" in result.stdout
    model = mlp(hidden=HIDDEN)
    model.load_state_dict(load_file(out), strict=True)
    assert model(torch.zeros(1, 64)).shape == (1, 10)


def test_pull_default_name_and_step(
    finished: tuple[Result, str], env: dict[str, str | None], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, job_id = finished
    monkeypatch.chdir(tmp_path)
    result = run(["pull", job_id], env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / f"{job_id}-step20.safetensors").is_file()
    assert_one_line_error(run(["pull", job_id, "--step", "7"], env), "no checkpoint at step 7")


def test_cancel_of_a_finished_job_changes_nothing(
    finished: tuple[Result, str], env: dict[str, str | None]
) -> None:
    _, job_id = finished
    result = run(["cancel", job_id], env)
    assert result.exit_code == 0, result.output
    assert "already SUCCEEDED" in result.stdout
    assert json.loads(run(["status", job_id, "--json"], env).stdout)["state"] == "SUCCEEDED"


def test_logs(finished: tuple[Result, str], env: dict[str, str | None]) -> None:
    _, job_id = finished
    for args in (["logs", job_id], ["logs", job_id, "--follow"]):  # --follow ends with the job
        result = run(args, env)
        assert result.exit_code == 0, result.output
        assert "submitted: 2 workers" in result.stdout and "SUCCEEDED" in result.stdout


# --- a running job: its workers, then cancel -----------------------------------------------------


def test_status_and_cancel_of_a_running_job(env: dict[str, str | None], tmp_path: Path) -> None:
    spec = tmp_path / "long.yaml"
    spec.write_text(JOB_YAML.replace("steps: 20", "steps: 100000").replace("name: cli-test",
                                                                          "name: cli-long"))
    result = run(["submit", str(spec)], env)
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()

    deadline = time.monotonic() + 60
    while True:
        data = json.loads(run(["status", job_id, "--json"], env).stdout)
        if sum(w["state"] == "running" for w in data["workers"]) == 2 and data["step"] > 0:
            break
        assert time.monotonic() < deadline, f"workers never ran: {data}"
        time.sleep(0.2)
    assert sorted(w["rank"] for w in data["workers"]) == [0, 1]
    assert set(data["workers"][0]) >= {"state", "step", "staleness", "max_staleness", "host",
                                       "restarts"}
    table = run(["status"], env).stdout
    assert "2/2" in next(line for line in table.splitlines() if job_id in line)
    details = run(["status", job_id], env).stdout
    assert "RUNNING" in details and "workers" in details and "STALENESS" in details

    result = run(["cancel", job_id], env)
    assert result.exit_code == 0, result.output
    assert job_id in result.stdout
    watched = run(["status", job_id, "--watch", "--json"], env)  # returns once the job ends
    assert watched.exit_code == 0, watched.output
    assert json.loads(watched.stdout.splitlines()[-1])["state"] == "CANCELLED"


# --- errors: one line, exit code 1 --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (JOB_YAML.replace("lr: 0.01", "lr: -1"), "optimizer.lr"),
        (JOB_YAML.replace("batch_size: 16", "batch_sise: 16"), "batch_sise"),
        (JOB_YAML + "model: [unclosed\n", "invalid YAML"),
    ],
    ids=["bad-value", "unknown-field", "bad-yaml"],
)
def test_invalid_spec_is_one_line(
    text: str, fragment: str, env: dict[str, str | None], tmp_path: Path
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    assert_one_line_error(run(["submit", str(spec)], env), fragment)


def test_missing_spec_file_is_a_usage_error(env: dict[str, str | None], tmp_path: Path) -> None:
    result = run(["submit", str(tmp_path / "nope.yaml")], env)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["status", "pull", "cancel", "logs"])
def test_unknown_job(command: str, env: dict[str, str | None], cli_server: Server) -> None:
    assert_one_line_error(run([command, "j-nosuchjob"], env), "job 'j-nosuchjob' not found")


def test_scale_of_an_unknown_job_and_of_a_size_below_one(env: dict[str, str | None], cli_server: Server) -> None:
    assert_one_line_error(run(["scale", "j-nosuchjob", "--workers", "2"], env), "job 'j-nosuchjob' not found")
    result = run(["scale", "j-nosuchjob", "--workers", "0"], env)
    assert result.exit_code == 2 and "Traceback" not in result.output  # a usage error, before any call


def test_unreachable_server_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed; nothing listens there
    start = time.monotonic()
    result = run(["status", "--server", f"127.0.0.1:{port}"], {"GRADHUB_SERVER": None})
    assert time.monotonic() - start < 5
    assert_one_line_error(result, "unavailable", f"127.0.0.1:{port}")


def test_token(tmp_path_factory: pytest.TempPathFactory, cli_server: Server) -> None:
    """A server that needs a token: refused without it, accepted from the env or a file."""
    with Server(ServerConfig(port=0, data_dir=tmp_path_factory.mktemp("auth"), token="s3cret")) as s:
        base = {"GRADHUB_SERVER": s.address, "GRADHUB_TOKEN": None}
        assert_one_line_error(run(["status"], base), "token")
        assert_one_line_error(run(["status"], {**base, "GRADHUB_TOKEN": "wrong"}))
        assert run(["status"], {**base, "GRADHUB_TOKEN": "s3cret"}).exit_code == 0
        token_file = tmp_path_factory.mktemp("tok") / "token"
        token_file.write_text("s3cret\n")
        result = run(["status", "--token-file", str(token_file)], {**base, "GRADHUB_TOKEN": "wrong"})
        assert result.exit_code == 0, result.output  # the file wins over the variable
        assert "no jobs" in result.stdout


# --- the server command and the demo -------------------------------------------------------------


def test_server_command_serves_until_sigterm(
    tmp_path: Path, cli_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gradhub server`` (port from GRADHUB_PORT) answers, then stops on SIGTERM, exit 0."""
    import os
    import signal

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answered: list[int] = []

    def client_then_sigterm() -> None:
        with Client(f"127.0.0.1:{port}", timeout=2) as c:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    answered.append(len(c.list_jobs()))
                    break
                except ServerUnavailableError:
                    time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    thread = threading.Thread(target=client_then_sigterm, daemon=True)
    thread.start()
    try:
        result = run(["server", "--data-dir", str(tmp_path / "data"), "--grace", "1"],
                     {"GRADHUB_PORT": str(port), "GRADHUB_TOKEN": None, "GRADHUB_HTTP_PORT": "0"})
    finally:
        thread.join(5)
        root.handlers[:], root.level = handlers, level  # basicConfig may have added one
    assert result.exit_code == 0, result.output
    assert answered == [0]
    assert f"listening on 127.0.0.1:{port} (data plane on port " in result.stdout
    assert f"workers reach it at 127.0.0.1:{port}" in result.stdout
    assert str((tmp_path / "data").resolve()) in result.stdout
    assert "dashboard and /metrics on http://127.0.0.1:" in result.stdout
    assert "accepts unauthenticated RPCs" in result.stderr
    assert "anyone who can reach" not in result.stderr  # loopback only
    assert "stopped" in result.stderr


def test_server_beyond_loopback_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    result = run(["server", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "data")],
                 {"GRADHUB_TOKEN": None, "GRADHUB_TOKEN_FILE": None, "GRADHUB_INSECURE": None})
    assert_one_line_error(result, "refusing to listen on 0.0.0.0", "--token-file", "--insecure")
    assert not (tmp_path / "data").exists(), "nothing was started or written"


@pytest.mark.parametrize("mode", ["ps-sync", "allreduce"])
def test_demo(tmp_path: Path, cli_server: Server, mode: str) -> None:
    out = tmp_path / "demo.safetensors"
    result = run(["demo", "--epochs", "1", "--mode", mode, "--out", str(out), "--data-dir", str(tmp_path / "d")],
                 {"COLUMNS": None})
    assert result.exit_code == 0, result.output
    assert out.is_file()
    for fragment in ("validation accuracy", "wall time", str(out), "load_state_dict", mode):
        assert fragment in result.stdout, result.stdout


def test_demo_with_an_unknown_mode_fails_naming_the_field(tmp_path: Path) -> None:
    result = run(["demo", "--mode", "ring", "--data-dir", str(tmp_path / "d")], {"COLUMNS": None})
    assert result.exit_code == 1 and "mode:" in result.output, result.output


# --- renderers ------------------------------------------------------------------------------------


def test_jobs_table_before_total_steps_is_known() -> None:
    from rich.console import Console

    info = JobInfo(id="j-1", name="n", mode="ps-sync", state="RUNNING", reason="", step=3,
                   total_steps=0, version=3, metrics={"loss": 0.5, "val_accuracy": 0.9},
                   samples_per_second=1234.0, created_at=1000.0, started_at=1001.0,
                   finished_at=None,
                   workers=(WorkerInfo(0, "running", 3, 0, 0, "h", 0, 1),
                            WorkerInfo(1, "starting", 0, 0, 0, "h", 0, 2)))
    console = Console(width=160, record=True)
    console.print(jobs_table([info], now=1190.0))
    row = console.export_text().splitlines()[-1]
    for cell in ("j-1", "RUNNING", "3/?", "0.5000", "90.0%", "1,234", "1/2", "3m ago"):
        assert cell in row, row
    assert ago(1000.0, now=1000.0 + 5) == "5s ago" and ago(None) == "-"


def test_an_elastic_jobs_details_show_its_size_and_idle_ranks() -> None:
    from rich.console import Console

    info = JobInfo(id="j-1", name="n", mode="ps-sync", state="RUNNING", reason="", step=30, total_steps=100,
                   version=30, metrics={}, samples_per_second=0.0, created_at=1000.0, started_at=1001.0,
                   finished_at=None, spec={"mode": "ps-sync", "workers": {"min": 1, "max": 3}},
                   world_size=3, size=1, target_size=2, min_workers=1,
                   workers=(WorkerInfo(0, "running", 30, 0, 0, "h", 0, 1), WorkerInfo(1, "starting", 0, 0, 0, "", 0, 0),
                            WorkerInfo(2, "idle", 30, 0, 0, "", 0, 0)))
    console = Console(width=160, record=True)
    console.print(job_details(info, [], now=1100.0))
    text = console.export_text()
    assert "1 workers now, scaled to 2 (1 to 3)" in text and "1 to 3 workers" in text, text
    assert any(line.split()[:2] == ["2", "idle"] for line in text.splitlines()), text
    assert workers_alive(info) == "1/1"


def test_a_sharded_jobs_details_list_its_shards() -> None:
    from rich.console import Console

    from gradhub.client.client import ShardInfo

    info = JobInfo(id="j-1", name="n", mode="ps-sync", state="RUNNING", reason="", step=30, total_steps=100,
                   version=30, metrics={}, samples_per_second=0.0, created_at=1000.0, started_at=1001.0,
                   finished_at=None, spec={"mode": "ps-sync", "ps_shards": 2}, world_size=2,
                   shards=(ShardInfo(0, "head", 0, 5000, 30, 2_400_000, 2_500_000, 41.5, 11),
                           ShardInfo(1, "10.0.0.2", 5000, 10000, 30, 2_400_000, 2_500_000, 40.0, 22)))
    console = Console(width=160, record=True)
    console.print(job_details(info, [], now=1100.0))
    text = console.export_text()
    assert "parameter-server shards" in text, text
    rows = [line.split() for line in text.splitlines()]
    assert ["0", "head", "11", "0..4,999", "30", "2.4", "MB", "2.5", "MB", "41.5"] in rows, text
    assert ["1", "10.0.0.2", "22", "5,000..9,999", "30", "2.4", "MB", "2.5", "MB", "40.0"] in rows, text


def test_server_on_a_corrupt_database_exits_with_one_line(tmp_path: Path, cli_server: Server) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "jobs.db").write_bytes(b"not a database" * 512)
    result = run(["server", "--port", "0", "--data-dir", str(data)])
    assert result.exit_code == 1
    assert_one_line_error(result, "cannot start the server: data_dir:", "jobs.db is not a readable gradhub job "
                          "database", "move it aside")


def test_a_second_server_on_a_data_dir_exits_with_one_line(cli_server: Server) -> None:
    result = run(["server", "--port", "0", "--data-dir", str(cli_server.config.data_dir)])
    assert result.exit_code == 1
    assert_one_line_error(result, "cannot start the server: data_dir:", "is in use by the gradhub server pid")


def test_a_server_with_a_wrong_tokens_file_exits_with_one_line(tmp_path: Path) -> None:
    tokens = tmp_path / "users.yaml"
    tokens.write_text("users: [{name: alice, token: short, role: user}]")
    result = run(["server", "--port", "0", "--data-dir", str(tmp_path / "data"), "--tokens-file", str(tokens)],
                 {"GRADHUB_TOKEN": None})
    assert_one_line_error(result, "cannot start the server: tokens_file: users[0].token:", "at least 16")


def test_the_owner_column_appears_when_jobs_have_owners() -> None:
    from rich.console import Console

    def job(job_id: str, owner: str) -> JobInfo:
        return JobInfo(id=job_id, name="n", mode="ps-sync", state="QUEUED", reason="", step=0, total_steps=0,
                       version=0, metrics={}, samples_per_second=0.0, created_at=1000.0, started_at=None,
                       finished_at=None, owner=owner)

    console = Console(width=160, record=True)
    console.print(jobs_table([job("j-1", "alice"), job("j-2", "")], now=1010.0))
    header, alice, nobody = console.export_text().splitlines()
    assert "OWNER" in header and "alice" in alice and " - " in nobody
    console = Console(width=160, record=True)
    console.print(jobs_table([job("j-3", "")], now=1010.0))
    assert "OWNER" not in console.export_text()
