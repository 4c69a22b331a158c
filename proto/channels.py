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
