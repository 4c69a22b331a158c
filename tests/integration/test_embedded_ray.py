"""The embedded Ray a server starts (no --ray-address): every process of it listens on loopback
only, and its GCS refuses a call that carries no token (the server sets a token of its own,
whatever the environment says: here it inherits RAY_AUTH_MODE=disabled). A real job runs on it.
The server runs in a process of its own, as in test_server_restart.py."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from gradhub.client.client import Client
from gradhub.server import embedded_ray

from ..server_process import ServerProcess


def listeners(pids: set[int]) -> dict[int, list[tuple[str, int]]]:
    """The TCP sockets in LISTEN state that processes ``pids`` hold: pid -> [(address, port)]."""
    by_inode: dict[str, tuple[str, int]] = {}
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            address = str(ipaddress.ip_address(raw)) if width == 4 else str(ipaddress.IPv6Address(raw))
            by_inode[fields[9]] = (address, int(hex_port, 16))
    out: dict[int, list[tuple[str, int]]] = {}
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        found = [by_inode[link[8:-1]] for link in links if link.startswith("socket:[") and link[8:-1] in by_inode]
        if found:
            out[pid] = found
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.mark.timeout(240)
def test_the_embedded_ray_listens_on_loopback_and_asks_for_a_token(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # inherited by the server: it must not matter
    server = ServerProcess(tmp_path / "data", tmp_path, "embedded").start()
    try:
        spec = {"name": "embedded", "workers": 1, "resources": {"cpus": 0.5}, "model": {"name": "mlp",
                "args": {"hidden": [8]}}, "dataset": "digits", "steps": 10}
        with Client(server.address) as client:
            assert client.submit(spec).wait(timeout=120).state == "SUCCEEDED"
            members = server.members()
            found = listeners(set(members))
            ray_processes = {pid for pid, cmd in members.items() if "ray" in cmd or "gcs_server" in cmd}
            assert ray_processes & set(found), f"no Ray listener found among {members}"
            wide = {members[pid][:80]: addrs for pid, addrs in found.items()
                    if not all(is_loopback(a) for a, _ in addrs)}
            assert not wide, f"listening beyond loopback: {wide}"

            gcs = [pid for pid, cmd in members.items() if "gcs_server" in cmd]
            assert gcs, members
            ports = [port for _, port in found.get(gcs[0], [])]
            assert ports, found
            for port in ports:  # RuntimeError when the GCS answers a call that carries no token
                embedded_ray.refuses_strangers(f"127.0.0.1:{port}")
    finally:
        server.kill()
