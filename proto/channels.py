"""How both ends' clients open their connections to a gradhub server: a gRPC channel, plain or
TLS, and the TLS context and buffers of a data-plane socket. ``tls_ca`` is the PEM of the certificates to
trust (the server's own for a self-signed one); ``None`` is plaintext, and ``SYSTEM_TRUST``
TLS verified against the system's certificate authorities."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Sequence
from typing import Any, Final

import grpc

SYSTEM_TRUST: Final = b""  # TLS, trusting the system's CAs (a certificate from a public CA)
# a data-plane Unix socket's send and receive buffers. The kernel's default (208 KiB) cuts a
# model of a few MB into dozens of writes, each waiting for the reader to make room: a 4.5 MB
# round trip took 1.6 ms with it and 0.7 ms with this (README, Performance).
UNIX_SOCKET_BUFFER: Final = 4 << 20
# a TCP read of a large payload wakes once this much has arrived (or the rest of the payload)
TCP_LOW_WATER: Final = 1 << 20


def open_channel(address: str, options: Sequence[tuple[str, Any]], tls_ca: bytes | None = None) -> grpc.Channel:
    """A channel to ``address`` (host:port): TLS verified against ``tls_ca`` unless it is None."""
    if tls_ca is None:
        return grpc.insecure_channel(address, options=list(options))
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca or None)
    return grpc.secure_channel(address, credentials, options=list(options))


def tls_context(tls_ca: bytes) -> ssl.SSLContext:
    """A client's TLS context that verifies the server (its name included) against ``tls_ca``."""
    context = ssl.create_default_context(cadata=tls_ca.decode() if tls_ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def widen_buffers(sock: socket.socket) -> None:
    """Give a data-plane Unix socket ``UNIX_SOCKET_BUFFER``-byte send and receive buffers, or
    as much as the kernel allows (``net.core.wmem_max`` and ``rmem_max`` cap what an
    unprivileged process gets). TCP keeps the kernel's autotuning, which grows its buffers
    with the link's bandwidth-delay product."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, UNIX_SOCKET_BUFFER)


class LowWater:
    """``SO_RCVLOWAT`` of a TCP socket that reads large payloads: a wait for readability ends
    once ``min(wanted, TCP_LOW_WATER)`` bytes are in (not at each segment), so a 100 MB payload
    takes about a hundred wakeups instead of thousands (each one a trip through the server's
    event loop: with 64 KB segments they cost a sixth of a TCP push + pull of 100 MB). Every
    other read keeps the default of one byte (a frame's header must not wait for bytes that
    are not coming). A read's idle timeout counts from its last wakeup, so it now allows a
    MiB per timeout (90 s: 12 KB/s) rather than a byte."""

    def __init__(self, sock: socket.socket, tcp: bool) -> None:
        self._sock, self._tcp, self._now = sock, tcp, 1

    def expect(self, wanted: int) -> None:
        """The next wait is for at most ``wanted`` bytes (exactly what the sender will send)."""
        low = min(wanted, TCP_LOW_WATER) if self._tcp and wanted > TCP_LOW_WATER // 4 else 1
        if low != self._now:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, low)
                self._now = low
