"""A gradhub server in a process of its own, leading a new session, with its own embedded Ray:
tests that kill it (SIGKILL of the whole process group, Ray and workers included), restart it
on the same data dir and port, and check that nothing of it outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import wait_for

START_TIMEOUT_S = 120.0

SERVER_SCRIPT = """
import logging, sys, threading
from pathlib import Path
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
port, data_dir, port_file, cpus = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
server = Server(ServerConfig(port=port, data_dir=data_dir, ray_num_cpus=cpus)).start()
tmp = port_file.with_name(port_file.name + ".tmp")
tmp.write_text(str(server.port))
tmp.replace(port_file)
threading.Event().wait()  # serve until killed
"""


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

    def __init__(self, data_dir: Path, log_dir: Path, name: str, ray_cpus: int = 2) -> None:
        """``ray_cpus``: the logical CPUs its Ray schedules workers on (the VM has two cores)."""
        self.data_dir, self.name, self.ray_cpus = data_dir, name, ray_cpus
        self.log = log_dir / f"{name}.log"
        self.port_file = log_dir / f"{name}.port"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.seen: dict[int, str] = {}  # every process of its session seen so far

    def start(self, port: int = 0) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not ours
        env["PYTHONFAULTHANDLER"] = "1"  # a crash in native code leaves every thread's stack in its log
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVER_SCRIPT, str(port), str(self.data_dir), str(self.port_file),
                 str(self.ray_cpus)],
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
