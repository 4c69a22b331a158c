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
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradhub.client.client import Client, JobInfo

from ..conftest import final_params, wait_for

CKPT_EVERY = 50
STEPS = {"ps-sync": 1000, "allreduce": 4000}  # allreduce steps are faster: the kill must land mid-run
START_TIMEOUT_S = 120.0

SERVER_SCRIPT = """
import logging, sys, threading
from pathlib import Path
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
port, data_dir, port_file = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
server = Server(ServerConfig(port=port, data_dir=data_dir, ray_num_cpus=2)).start()
tmp = port_file.with_name(port_file.name + ".tmp")
tmp.write_text(str(server.port))
tmp.replace(port_file)
threading.Event().wait()  # serve until killed
"""


def spec(name: str, checkpoint_every: int, mode: str) -> dict:
    return {
        "name": name, "mode": mode, "workers": 2, "resources": {"cpus": 0.25},
        "model": {"name": "mlp", "args": {"hidden": [128, 128]}}, "dataset": "digits",
        "optimizer": {"name": "adam", "lr": 0.001}, "batch_size": 16, "steps": STEPS[mode], "seed": 5,
        "checkpoint_every": checkpoint_every,
    }


# --- a server in its own process group ---------------------------------------------------------


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _session_members(sid: int) -> dict[int, str]:
    """Live processes of session ``sid``: pid -> command line."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            members[int(entry.name)] = cmdline.strip()
    return members


class ServerProcess:
    """``gradhub``'s Server with an embedded Ray, in a child process that leads a new session."""

    def __init__(self, data_dir: Path, log_dir: Path, name: str) -> None:
        self.data_dir, self.name = data_dir, name
        self.log = log_dir / f"{name}.log"
        self.port_file = log_dir / f"{name}.port"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.seen: dict[int, str] = {}  # every process of its session seen so far

    def start(self, port: int = 0) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not ours
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVER_SCRIPT, str(port), str(self.data_dir), str(self.port_file)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"server {self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            return self.port_file.exists()

        wait_for(up, START_TIMEOUT_S, f"server {self.name} to start", interval=0.1)
        self.port = int(self.port_file.read_text())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def members(self) -> dict[int, str]:
        """Its session's live processes now (also remembered in ``seen``)."""
        assert self.proc is not None
        now = _session_members(self.proc.pid)
        self.seen.update(now)
        return now

    def kill(self) -> None:
        """SIGKILL the whole process group: the server, its Ray and Ray's workers."""
        if self.proc is None:
            return
        self.members()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def assert_nothing_left(server: ServerProcess, extra_pids: set[int] = frozenset()) -> None:
    """Every process the server's session ever had, and ``extra_pids``, is gone (dead: zombies
    waiting for init to reap them count as gone), and ``ps`` shows no live ``ray::`` process
    of that session."""
    assert server.proc is not None
    sid, pids = server.proc.pid, set(server.seen) | set(extra_pids)

    def left() -> dict[int, str]:
        return {**_session_members(sid), **{p: server.seen.get(p, "?") for p in pids if _alive(p)}}

    deadline = time.monotonic() + 30
    while left():
        if time.monotonic() > deadline:
            pytest.fail(f"processes of server {server.name} outlived it: {left()}")
        time.sleep(0.1)
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True,
                        check=True).stdout.splitlines()
    strays = [line for line in ps if "ray::" in line and int(line.split()[1]) == sid
              and not line.split()[2].startswith("Z")]
    assert not strays, strays


# --- the test -----------------------------------------------------------------------------------


@pytest.mark.timeout(420)
@pytest.mark.parametrize("mode", list(STEPS))
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
