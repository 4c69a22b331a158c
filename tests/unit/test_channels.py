"""A data-plane socket's settings (``gradhub.proto.channels``): a TCP read of a large payload
wakes once a MiB is in (``SO_RCVLOWAT``), never waits for more than the payload's rest, and
every other read wakes at its first byte."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator

import pytest

from gradhub.proto.channels import TCP_LOW_WATER, LowWater


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    with sender, receiver:
        yield sender, receiver


def _low(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


def test_a_large_tcp_read_wakes_at_a_mib_or_the_payloads_rest(tcp_pair) -> None:
    sender, receiver = tcp_pair
    low = LowWater(receiver, tcp=True)
    low.expect(100 << 20)
    assert _low(receiver) == TCP_LOW_WATER
    sender.sendall(b"x" * 1000)
    assert select.select([receiver], [], [], 0.2)[0] == []  # a thousand bytes do not wake it
    sender.sendall(b"x" * TCP_LOW_WATER)
    assert select.select([receiver], [], [], 10)[0] == [receiver]
    low.expect(TCP_LOW_WATER // 2)  # the payload's last half MiB: no more than that
    assert _low(receiver) == TCP_LOW_WATER // 2
    low.expect(64 << 10)  # a frame's header, or a small payload: its first byte
    assert _low(receiver) == 1


def test_other_sockets_keep_waking_at_the_first_byte() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        LowWater(b, tcp=False).expect(100 << 20)
        assert _low(b) == 1
