"""Server configuration: a frozen dataclass, validated on construction, and the one place
where every server default lives (the CLI and the job manager read theirs from here).

Precedence (resolved once, in the CLI): command-line option > ``GRADHUB_*``
environment variable > default. Library code never reads the environment.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (tests)
    data_dir: Path = Path("gradhub-data")
    ray_address: str | None = None  # None: start an embedded local Ray
    # host:port that workers use to reach this server; default: this node's Ray IP and the bound port
    advertise_address: str | None = None
    token: str | None = None  # when set, every user's RPC needs "authorization: Bearer <token>"
    # users with tokens, roles and quotas (``gradhub.server.auth``), instead of one shared token
    tokens_file: Path | None = None
    # TLS for the gRPC port and the data plane's TCP port: the server's certificate chain and
    # key (PEM files); workers verify the server with ``tls_ca`` (default: ``tls_cert`` itself,
    # right for a self-signed certificate)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # listen beyond loopback without a token (whoever reaches the port can run code on the
    # workers): refused unless this says so
    insecure: bool = False
    # the pool that runs the short (sync) RPC handlers; every call that waits or streams runs
    # on the event loop instead, so a few threads serve any number of workers (more only add
    # contention for the GIL)
    max_rpc_threads: int = 16
    # the HTTP side (dashboard, /metrics, /healthz) on ``host``: None serves none (a server
    # embedded in a program or a test); `gradhub server` serves it on DEFAULT_HTTP_PORT
    http_port: int | None = None
    # the data plane (ps modes' tensors): TCP port on ``host`` (0: any free port; a cluster
    # behind a firewall or in containers fixes it), beside a Unix socket for workers on this host
    data_port: int = 0
    # the largest model (parameters, float32 bytes) a job may have: checked before a byte of it
    # is received
    max_model_bytes: int = 4 << 30
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 20.0
    ray_num_cpus: int | None = None  # embedded Ray only: logical CPUs (default: the machine's)
    # after a start, how long a requeued job that does not fit waits for nodes to (re)join
    node_join_grace_s: float = 120.0
    # allreduce mode: a collective that waits this long for a (hung) peer fails, and the group
    # restarts; a worker that dies is noticed at once, whatever this is
    collective_timeout_s: float = 120.0
    poll_s: float = 0.25  # how often a job's monitor looks at its workers
    stop_grace_s: float = 5.0  # on shutdown, how long running RPCs get to finish
    # jobs that ended longer ago than this are deleted with their checkpoints and working dirs
    # (at start, then hourly); 0 keeps them until `gradhub delete`
    retention_days: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be 0..65535, got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port: must be 0..65535 (or None: no HTTP), got {self.http_port}")
        if not 0 <= self.data_port <= 65535:
            raise ValueError(f"data_port: must be 0..65535, got {self.data_port}")
        if self.max_model_bytes < 1:
            raise ValueError("max_model_bytes: must be >= 1")
        if self.max_rpc_threads < 8:
            raise ValueError("max_rpc_threads: must be >= 8 (short calls run in this pool)")
        if self.token is not None and not self.token.strip():
            raise ValueError("token: is empty")
        if self.token is not None and self.tokens_file is not None:
            raise ValueError("token: give a token or a tokens_file, not both")
        if self.token is None and self.tokens_file is None and not self.insecure and not is_loopback(self.host):
            raise ValueError(f"token: refusing to listen on {self.host} without one: whoever reaches the port "
                             "could run code on the workers. Give a token (gradhub server --token-file, "
                             "GRADHUB_TOKEN) or users (--tokens-file), or --insecure (GRADHUB_INSECURE=1) "
                             "to run open anyway")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert: TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca: is for workers to verify the server's certificate; give --tls-cert too")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s: must exceed heartbeat_interval_s")
        if self.node_join_grace_s < 0:
            raise ValueError("node_join_grace_s: must be >= 0")
        if self.collective_timeout_s < 1:
            raise ValueError("collective_timeout_s: must be >= 1")
        if not self.poll_s > 0:
            raise ValueError("poll_s: must be > 0")
        if self.stop_grace_s < 0:
            raise ValueError("stop_grace_s: must be >= 0")
        if not self.retention_days >= 0:
            raise ValueError("retention_days: must be >= 0 (0: keep every job)")
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        for name in ("tokens_file", "tls_cert", "tls_key", "tls_ca"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


DEFAULT_HTTP_PORT = 50080  # `gradhub server`'s dashboard and /metrics


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, bracketed or not) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default(name: str) -> object:
    """The default of ``ServerConfig.<name>`` (for the CLI's options)."""
    for f in fields(ServerConfig):
        if f.name == name:
            return f.default
    raise KeyError(name)
