"""Hosts made of Linux network namespaces on one machine, for tests that need real network hops.

Each ``Host`` is a namespace with its own loopback and one veth into a bridge in the root
namespace (which takes ``BRIDGE_IP``), so the hosts and the test process reach each other over
198.18.0.0/24, part of 198.18.0.0/15 (RFC 2544, benchmarking): nothing is routed, nothing
leaves the machine. Every name carries the test process's pid, so a run never collides with
another; ``remove_stale`` clears what a killed earlier run left behind. Needs root and ``ip``.

    with Network() as net:
        head = net.add_host("head", "198.18.0.1")
        net.spawn(head, ["sh", "script"], env, log_path)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

PREFIX = "ghmh"  # gradhub multihost: the prefix of every namespace, link and temp dir made here
SUBNET_PREFIX_LEN = 24
BRIDGE_IP = "198.18.0.254"
IP_TIMEOUT_S = 15.0


def check_prerequisites() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "the multihost tests create network namespaces and need root (run them as root, as CI does)"
    if shutil.which("ip") is None:
        return "the multihost tests need `ip` (Debian: apt-get install iproute2)"
    return None


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; its stdout."""
    out = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def netns_pids(netns: str) -> list[int]:
    """The live processes whose network namespace is ``netns``."""
    return [int(p) for p in ip("netns", "pids", netns, check=False).split()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_processes(netns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in ``netns`` until none is left (they may still be forking)."""
    deadline = time.monotonic() + timeout
    while pids := netns_pids(netns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"netns {netns}: processes {pids} survive SIGKILL")
        time.sleep(0.1)


def remove_stale() -> None:
    """Delete namespaces, bridges and temp dirs of earlier runs whose process is gone."""
    owner = re.compile(rf"^{PREFIX}(\d+)")

    def stale(name: str) -> bool:
        m = owner.match(name)
        return m is not None and not _pid_alive(int(m.group(1)))

    for line in ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        if stale(name):
            _kill_netns_processes(name)
            ip("netns", "delete", name, check=False)
    for line in ip("-o", "link", "show", check=False).splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if stale(name):
            ip("link", "delete", name, check=False)
    for path in Path("/tmp").glob(f"{PREFIX}*"):
        if stale(path.name):
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Host:
    """One namespace: a role, its address, and the processes started in it."""

    role: str
    netns: str
    ip: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


class Network:
    """A bridge in the root namespace and the hosts attached to it; ``stop`` removes them all,
    and kills every process in every host, whatever state the test left them in."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}b"
        self.hosts: list[Host] = []
        self.temp_dir = Path(f"/tmp/{self.tag}")  # short: Ray's socket paths must fit 107 bytes
        self._started = False

    def start(self) -> Self:
        remove_stale()
        self._started = True
        self.temp_dir.mkdir(exist_ok=True)
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{BRIDGE_IP}/{SUBNET_PREFIX_LEN}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, role: str, address: str) -> Host:
        host = Host(role, f"{self.tag}-{role}", address)
        veth = f"{self.tag}v{len(self.hosts)}"
        self.hosts.append(host)  # before it exists: stop() deletes whatever part was made
        ip("netns", "add", host.netns)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        ip("link", "set", veth, "master", self.bridge, "up")
        ip("-n", host.netns, "link", "set", "lo", "up")
        ip("-n", host.netns, "addr", "add", f"{address}/{SUBNET_PREFIX_LEN}", "dev", "eth0")
        ip("-n", host.netns, "link", "set", "eth0", "up")
        return host

    def spawn(self, host: Host, argv: Sequence[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``host``'s namespace, as the leader of a new process group."""
        with log.open("ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", host.netns, *argv], env=dict(env),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        host.procs.append(proc)
        return proc

    def kill_host(self, host: Host) -> None:
        """Kill the host's process groups and then anything else left in its namespace."""
        for proc in host.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _kill_netns_processes(host.netns)
        for proc in host.procs:
            proc.wait(timeout=10)
        host.procs.clear()

    def stop(self) -> None:
        """Remove everything ``start`` and ``add_host`` made; tries every step, raises the first error."""
        errors: list[Exception] = []
        for host in self.hosts:
            try:
                self.kill_host(host)
            except Exception as e:  # noqa: BLE001 - go on: the namespace must go regardless
                errors.append(e)
            ip("netns", "delete", host.netns, check=False)  # takes the veth pair with it
        self.hosts.clear()
        if self._started:
            ip("link", "delete", self.bridge, check=False)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self._started = False
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
