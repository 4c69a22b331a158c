"""The server's TLS material (``--tls-cert``, ``--tls-key``, ``--tls-ca``), read and checked
once at start: gRPC's server credentials, the data plane's TLS context, and the PEM that the
workers trust (``--tls-ca``, else the certificate itself, which suits a self-signed one)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class ServerTLS:
    cert: Path
    key: Path
    chain: bytes  # the certificate (chain) as PEM
    private_key: bytes
    workers_trust: bytes  # what workers verify the server with

    @classmethod
    def load(cls, cert: Path, key: Path, ca: Path | None = None) -> ServerTLS:
        """Read and check the files; ValueError naming the file when one cannot be used."""
        pems = {}
        for name, path in (("tls_cert", cert), ("tls_key", key), ("tls_ca", ca)):
            if path is None:
                continue
            try:
                pems[name] = Path(path).read_bytes()
            except OSError as e:
                raise ValueError(f"{name}: cannot read {path} ({e.strerror or e})") from e
            if b"-----BEGIN " not in pems[name]:
                raise ValueError(f"{name}: {path} is not a PEM file")
        tls = cls(Path(cert), Path(key), pems["tls_cert"], pems["tls_key"], pems.get("tls_ca", pems["tls_cert"]))
        tls.ssl_context()  # the certificate and the key must belong together
        return tls

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.chain)])

    def ssl_context(self) -> ssl.SSLContext:
        """The data plane's server-side TLS context."""
        try:
            return server_context(self.cert, self.key)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"tls_key: {self.key} does not go with the certificate {self.cert}, or one of "
                             f"them is not a valid PEM ({e})") from e


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or later) with the certificate chain and key in these
    PEM files: the data plane's, and a parameter-server shard's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
