"""How both ends' clients open their connections to a gradhub server: a gRPC channel, plain or
TLS, and the TLS context of a data-plane socket. ``tls_ca`` is the PEM of the certificates to
trust (the server's own for a self-signed one); ``None`` is plaintext, and ``SYSTEM_TRUST``
TLS verified against the system's certificate authorities."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any, Final

import grpc

SYSTEM_TRUST: Final = b""  # TLS, trusting the system's CAs (a certificate from a public CA)


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
