"""The ``gradhub`` command line: run a server, submit and follow jobs, pull checkpoints, demo.

Options resolve command line > ``GRADHUB_*`` environment variable > default (typer's
``envvar=``); the token comes from ``--token-file``, else ``GRADHUB_TOKEN``; the server's TLS
trust from ``--tls-ca`` (``GRADHUB_TLS_CA``) or, with ``GRADHUB_TLS=1``, the system. This is the edge
where domain errors become one line on stderr and exit code 1; usage errors exit with 2.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
from rich.console import Console
from rich.live import Live

from gradhub.client.client import CheckpointMeta, Client, JobInfo, MetricPoint
from gradhub.client.demo import checkpoint_filename, run_demo
from gradhub.client.progress import job_details, jobs_table, number
from gradhub.proto.contract.errors import GradhubError, NotFoundError, ServerUnavailableError
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.contract.states import JobState
from gradhub.server.config import DEFAULT_HTTP_PORT, ServerConfig, is_loopback

DEFAULT_SERVER = "localhost:50051"
_SERVER_DEFAULTS = ServerConfig()  # `gradhub server` reads its defaults from ServerConfig only
EXIT_INTERRUPTED = 130
PIPED_WIDTH = 200

app = typer.Typer(
    name="gradhub",
    help="Distributed PyTorch training: a gRPC parameter server with Ray workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ServerOpt = Annotated[
    str,
    typer.Option("--server", envvar="GRADHUB_SERVER", help="The gradhub server, host:port."),
]
TokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--token-file", exists=True, dir_okay=False, readable=True,
        help="A file holding the bearer token (default: the GRADHUB_TOKEN variable).",
    ),
]
TlsCaOpt = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca", envvar="GRADHUB_TLS_CA", exists=True, dir_okay=False, readable=True,
        help="The server speaks TLS: verify it with these certificates (PEM; the server's own when "
             "self-signed). GRADHUB_TLS=1 verifies it with the system's CAs instead.",
    ),
]
JobArg = Annotated[str, typer.Argument(metavar="JOB", help="The job id (j-...).")]


# --- the edge: errors, tokens, clients --------------------------------------------------------


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {' '.join(message.split())}", err=True)  # always exactly one line
    raise typer.Exit(code)


@contextlib.contextmanager
def _edge(server: str | None = None) -> Iterator[None]:
    """Turn the errors a user can cause or fix into ``error: ...`` and exit code 1."""
    try:
        yield
    except ServerUnavailableError as e:
        hint = f"; is a gradhub server running at {server}? (--server or GRADHUB_SERVER)"
        _fail(f"{e}{hint if server and 'server unavailable' in str(e) else ''}")
    except (GradhubError, TimeoutError, OSError) as e:
        _fail(str(e) or type(e).__name__)
    except grpc.RpcError as e:  # the client translates its calls' errors; this is a fallback
        _fail(f"{e.code().name}: {e.details()}")


def _token(token_file: Path | None) -> str | None:
    """``--token-file`` (stripped), else GRADHUB_TOKEN, else None."""
    if token_file is not None:
        token = token_file.read_text(encoding="utf-8").strip()
        if not token:
            raise GradhubError(f"--token-file: {token_file} is empty")
        return token
    return os.environ.get("GRADHUB_TOKEN") or None


@contextlib.contextmanager
def _session(server: str, token_file: Path | None, tls_ca: Path | None = None) -> Iterator[Client]:
    """A client for one command, inside the error edge: TLS with ``--tls-ca`` (GRADHUB_TLS_CA),
    or with the system's CAs when GRADHUB_TLS=1."""
    tls = os.environ.get("GRADHUB_TLS", "").lower() in ("1", "true", "yes")
    with _edge(server), Client(server, token=_token(token_file), tls=tls, tls_ca=tls_ca) as client:
        yield client


def _stdout() -> Console:
    """Rich output on stdout; piped, it is not cut to 80 columns (COLUMNS still applies)."""
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = PIPED_WIDTH
    return console


# --- commands ----------------------------------------------------------------------------------


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"gradhub {version('gradhub')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Distributed PyTorch training: a gRPC parameter server with Ray workers."""


@app.command()
def server(
    host: Annotated[str, typer.Option(envvar="GRADHUB_HOST", help="Interface to listen on.")] = (
        _SERVER_DEFAULTS.host
    ),
    port: Annotated[
        int, typer.Option(envvar="GRADHUB_PORT", min=0, max=65535, help="Port (0: any free one).")
    ] = _SERVER_DEFAULTS.port,
    data_dir: Annotated[
        Path, typer.Option(envvar="GRADHUB_DATA_DIR", file_okay=False, help="Jobs and checkpoints.")
    ] = _SERVER_DEFAULTS.data_dir,
    ray_address: Annotated[
        str | None,
        typer.Option(envvar="GRADHUB_RAY_ADDRESS", help="A Ray cluster (default: a local Ray)."),
    ] = None,
    advertise_address: Annotated[
        str | None,
        typer.Option(
            envvar="GRADHUB_ADVERTISE_ADDRESS",
            help="host:port workers use to reach this server (default: this node's IP, the port).",
        ),
    ] = None,
    token_file: TokenFileOpt = None,
    grace: Annotated[
        float, typer.Option(min=0, help="Seconds running RPCs get to finish on shutdown.")
    ] = _SERVER_DEFAULTS.stop_grace_s,
    node_join_grace: Annotated[
        float,
        typer.Option(min=0, envvar="GRADHUB_NODE_JOIN_GRACE",
                     help="After a start, seconds a requeued job that does not fit waits for "
                          "worker nodes to join before it fails."),
    ] = _SERVER_DEFAULTS.node_join_grace_s,
    collective_timeout: Annotated[
        float,
        typer.Option(min=1, envvar="GRADHUB_COLLECTIVE_TIMEOUT",
                     help="allreduce mode: seconds a collective waits for a hung peer before the "
                          "group restarts (a dead worker is noticed at once)."),
    ] = _SERVER_DEFAULTS.collective_timeout_s,
    data_port: Annotated[
        int,
        typer.Option(min=0, max=65535, envvar="GRADHUB_DATA_PORT",
                     help="TCP port of the data plane (the ps modes' tensors) on --host; 0: any free "
                          "port. Fix it where workers reach the server through a firewall or a "
                          "container's published ports."),
    ] = _SERVER_DEFAULTS.data_port,
    retention_days: Annotated[
        float,
        typer.Option(min=0, envvar="GRADHUB_RETENTION_DAYS",
                     help="Delete jobs that ended more than this many days ago, with their checkpoints "
                          "and working dirs (at start, then hourly); 0 keeps them."),
    ] = _SERVER_DEFAULTS.retention_days,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", envvar="GRADHUB_INSECURE",
                     help="Listen beyond loopback without a token (refused otherwise): whoever reaches "
                          "the port can run code on the workers."),
    ] = False,
    max_model_bytes: Annotated[
        int,
        typer.Option(min=1, envvar="GRADHUB_MAX_MODEL_BYTES",
                     help="Largest model (float32 parameter bytes) a job may send; checked before "
                          "a byte of it is received."),
    ] = _SERVER_DEFAULTS.max_model_bytes,
    http_port: Annotated[
        int,
        typer.Option(min=0, max=65535, envvar="GRADHUB_HTTP_PORT",
                     help="The dashboard, /metrics (Prometheus) and /healthz, on --host; 0: any free port."),
    ] = DEFAULT_HTTP_PORT,
    no_http: Annotated[
        bool, typer.Option("--no-http", envvar="GRADHUB_NO_HTTP", help="Serve no HTTP (no dashboard, no /metrics).")
    ] = False,
    tokens_file: Annotated[
        Path | None,
        typer.Option("--tokens-file", envvar="GRADHUB_TOKENS_FILE", exists=True, dir_okay=False, readable=True,
                     help="Users instead of one token: a YAML file of names, tokens, roles (admin, user, "
                          "viewer) and quotas (see README, Security)."),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option("--tls-cert", envvar="GRADHUB_TLS_CERT", exists=True, dir_okay=False, readable=True,
                     help="Serve TLS (the gRPC port and the data plane's TCP port) with this certificate "
                          "chain (PEM); needs --tls-key."),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option("--tls-key", envvar="GRADHUB_TLS_KEY", exists=True, dir_okay=False, readable=True,
                     help="The private key of --tls-cert (PEM)."),
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option("--tls-ca", envvar="GRADHUB_TLS_CA", exists=True, dir_okay=False, readable=True,
                     help="What workers verify the server's certificate with (PEM; default: --tls-cert "
                          "itself, right for a self-signed one)."),
    ] = None,
) -> None:
    """Run the gradhub server until Ctrl-C or SIGTERM, then stop gracefully."""
    from gradhub.server.app import Server
    from gradhub.server.config import ServerConfig

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a crash in native code (Ray, torch, gRPC) writes every thread's Python stack to stderr
    # (where stderr is a file: an in-process runner's, such as typer's CliRunner, is not)
    with contextlib.suppress(io.UnsupportedOperation):
        faulthandler.enable()
    with _edge():
        token = _token(token_file)
    try:
        config = ServerConfig(host=host, port=port, data_dir=data_dir, ray_address=ray_address,
                              advertise_address=advertise_address, token=token,
                              node_join_grace_s=node_join_grace, collective_timeout_s=collective_timeout,
                              stop_grace_s=grace, data_port=data_port, max_model_bytes=max_model_bytes,
                              insecure=insecure, retention_days=retention_days, tokens_file=tokens_file,
                              tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca,
                              http_port=None if no_http else http_port)
    except ValueError as e:
        _fail(str(e))
    srv = Server(config)
    try:
        srv.start()
    except (GradhubError, RuntimeError, ConnectionError, OSError, ValueError) as e:
        srv.stop(0)
        _fail(f"cannot start the server: {e}")
    typer.echo(f"gradhub server listening on {_hostport(host, srv.port)} (data plane on port "
               f"{srv.data_port}), workers reach it at {srv.advertise_address}, data in {data_dir.resolve()}")
    if srv.http_port:
        scheme = "https" if tls_cert else "http"
        typer.echo(f"dashboard and /metrics on {scheme}://{_hostport(_browsable(host), srv.http_port)}/")
    if token is None and tokens_file is None:
        warning = ("warning: no token (--token-file or GRADHUB_TOKEN): the server accepts "
                   "unauthenticated RPCs")
        if not is_loopback(host):
            warning = (f"warning: --insecure: no token, and anyone who can reach {_hostport(host, srv.port)} "
                       "can run code on the workers")
        typer.echo(warning, err=True)
    elif tls_cert is None and not is_loopback(host):
        typer.echo("warning: no TLS (--tls-cert): tokens, gradients and parameters cross the network in "
                   "clear text", err=True)
    _wait_for_signal()
    typer.echo(f"gradhub server: stopping (grace {grace:g} s)", err=True)
    try:
        srv.stop(config.stop_grace_s)
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
        raise typer.Exit(EXIT_INTERRUPTED) from None
    typer.echo("gradhub server: stopped", err=True)


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM; the previous handlers are back afterwards."""
    stop = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in signals}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _browsable(host: str) -> str:
    """Where a browser on this machine reaches a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "[::]", "") else host


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@app.command()
def submit(
    spec_file: Annotated[
        Path,
        typer.Argument(metavar="JOB.yaml", exists=True, dir_okay=False, readable=True,
                       help="The job spec (YAML or JSON); a relative working_dir is taken "
                            "relative to this file's folder."),
    ],
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Follow the job with a progress bar until it ends.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="With --wait: give up after this many seconds.")
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token_file: TokenFileOpt = None,
    tls_ca: TlsCaOpt = None,
) -> None:
    """Submit a job and print its id; with --wait, follow it and print its final metrics."""
    with _session(server, token_file, tls_ca) as client:
        job = client.submit(_load_spec(spec_file))
        typer.echo(job.id)
        if not wait:
            return
        try:
            info = job.wait(timeout=timeout, progress=True)  # JobFailedError unless SUCCEEDED
        except KeyboardInterrupt:
            typer.echo(f"{job.id} keeps running on the server; follow it with "
                       f"`gradhub status {job.id} --watch`", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        typer.echo(_final_line(info))


def _load_spec(path: Path) -> JobSpec:
    spec = JobSpec.from_yaml(path)
    if spec.working_dir and not Path(spec.working_dir).is_absolute():
        spec = spec.replace(working_dir=str((path.parent / spec.working_dir).resolve()))
    return spec


def _final_line(info: JobInfo) -> str:
    ran = ""
    if info.started_at and info.finished_at:
        ran = f" in {info.finished_at - info.started_at:.1f} s"
    metrics = ", ".join(f"{k} {number(v)}" for k, v in sorted(info.metrics.items()))
    return f"{info.id} {info.state}: step {info.step}/{info.total_steps}{ran}" + (
        f"; {metrics}" if metrics else "")


@app.command()
def status(
    job_id: Annotated[
        str | None, typer.Argument(metavar="JOB", help="A job id, or a sweep id (s-...: its leaderboard); "
                                                       "without it, all jobs.")
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh live until the job ends (or Ctrl-C).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (with --watch: one line "
                                                         "per update).")] = False,
    interval: Annotated[
        float, typer.Option(min=0.1, help="With --watch and no JOB: seconds between refreshes.")
    ] = 1.0,
    server: ServerOpt = DEFAULT_SERVER,
    token_file: TokenFileOpt = None,
    tls_ca: TlsCaOpt = None,
) -> None:
    """A table of jobs, or one job in detail: workers, metrics, checkpoints; a sweep's leaderboard."""
    if job_id is not None and is_sweep_id(job_id):
        _sweep_status(job_id, watch, as_json, server, token_file, tls_ca)
        return
    console = _stdout()
    with _session(server, token_file, tls_ca) as client:
        if not watch:
            if job_id is None:
                jobs = client.list_jobs()
                if as_json:
                    typer.echo(json.dumps([j.to_dict() for j in jobs], indent=2))
                else:
                    console.print(jobs_table(jobs) if jobs else "no jobs")
            else:
                info, ckpts = client.get_job(job_id), client.list_checkpoints(job_id)
                if as_json:
                    typer.echo(json.dumps(_job_json(info, ckpts), indent=2))
                else:
                    console.print(job_details(info, ckpts, points=client.metrics(job_id),
                                              width=_curve_width(console)))
            return
        with contextlib.suppress(KeyboardInterrupt):
            if job_id is not None:
                _watch_job(client, job_id, console, as_json)
            else:
                _watch_jobs(client, console, as_json, interval)


def _job_json(info: JobInfo, checkpoints: list[CheckpointMeta]) -> dict[str, Any]:
    return {**info.to_dict(), "checkpoints": [asdict(c) for c in checkpoints]}


def _curve_width(console: Console) -> int:
    """How wide the curves may be drawn: what the terminal has beside their other columns."""
    return max(min(console.width - 50, 80), 0)


def _watch_job(client: Client, job_id: str, console: Console, as_json: bool) -> None:
    """Follow one job until it ends; checkpoints are listed again at most every 2 s, and new
    curve points fetched at most every second."""
    ckpts: list[CheckpointMeta] = []
    points: list[MetricPoint] = []
    listed_at = fetched_at = float("-inf")

    def checkpoints(info: JobInfo) -> list[CheckpointMeta]:
        nonlocal ckpts, listed_at
        if info.done or time.monotonic() - listed_at >= 2.0:
            ckpts, listed_at = client.list_checkpoints(job_id), time.monotonic()
        return ckpts

    def curve_points(info: JobInfo) -> list[MetricPoint]:
        nonlocal fetched_at
        if info.done or time.monotonic() - fetched_at >= 1.0:
            points.extend(client.metrics(job_id, after=points[-1].seq if points else 0))
            fetched_at = time.monotonic()
        return points

    if as_json:
        for info in client.watch(job_id):
            typer.echo(json.dumps(_job_json(info, checkpoints(info))))
        return
    with Live(console=console, auto_refresh=False) as live:
        for info in client.watch(job_id):
            live.update(job_details(info, checkpoints(info), points=curve_points(info),
                                    width=_curve_width(console)), refresh=True)


@app.command()
def top(
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes.")] = 1.0,
    server: ServerOpt = DEFAULT_SERVER,
    token_file: TokenFileOpt = None,
    tls_ca: TlsCaOpt = None,
) -> None:
    """The table of jobs, refreshed in place until Ctrl-C (as `status --watch` without a job)."""
    with _session(server, token_file, tls_ca) as client, contextlib.suppress(KeyboardInterrupt):
        _watch_jobs(client, _stdout(), False, interval)


def _watch_jobs(client: Client, console: Console, as_json: bool, interval: float) -> None:
    """Refresh the table of jobs every ``interval`` seconds until Ctrl-C."""
    if as_json:
        while True:
            typer.echo(json.dumps([j.to_dict() for j in client.list_jobs()]))
            time.sleep(interval)
    with Live(console=console, auto_refresh=False) as live:
        while True:
            live.update(jobs_table(client.list_jobs()), refresh=True)
            time.sleep(interval)


@app.command()
def pull(
    job_id: JobArg,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="FILE",
                     help="Where to write (default: <job>-step<step>.safetensors here; a folder "
                          "gets that name inside it)."),
    ] = None,
    step: Annotated[
        int | None, typer.Option(min=0, help="The checkpoint's step (default: the latest).")
    ] = None,
    best: Annotated[
        bool, typer.Option("--best", help="For a sweep (s-...): the best trial's final checkpoint.")
    ] = False,
    server: ServerOpt = DEFAULT_SERVER,
    token_file: TokenFileOpt = None,
    tls_ca: TlsCaOpt = None,
) -> None:
    """Download a checkpoint (safetensors) and verify its sha256; `--best` of a sweep."""
    if best or is_sweep_id(job_id):
        _pull_best(job_id, output, best, step, server, token_file, tls_ca)
        return
    with _session(server, token_file, tls_ca) as client:
        if step is None and (output is None or output.is_dir()):
            steps = [c.step for c in client.list_checkpoints(job_id)]
            if not steps:
                raise NotFoundError(f"job {job_id!r} has no checkpoints yet")
            step = max(steps)
        if output is None or output.is_dir():
            output = (output or Path()) / checkpoint_filename(job_id, step or 0)
        meta = client.pull_checkpoint(job_id, output, step=step)
        typer.echo(f"{output}  step {meta.step}  sha256 {meta.sha256} (verified)")


@app.command()
def delete(job_id: JobArg, server: ServerOpt = DEFAULT_SERVER, token_file: TokenFileOpt = None,
           tls_ca: TlsCaOpt = None) -> None:
    """Delete a job that has ended, with its log, checkpoints and working dir (cancel a running
    job first)."""
    with _session(server, token_file, tls_ca) as client:
        client.delete(job_id)
        typer.echo(f"{job_id} deleted")


@app.command()
def cancel(job_id: JobArg, server: ServerOpt = DEFAULT_SERVER, token_file: TokenFileOpt = None,
           tls_ca: TlsCaOpt = None) -> None:
    """Cancel a queued or running job (a job that has ended is left as it is), or a sweep."""
    if is_sweep_id(job_id):
        _cancel_sweep(job_id, server, token_file, tls_ca)
        return
    with _session(server, token_file, tls_ca) as client:
        before = client.get_job(job_id)
        if before.done:
            typer.echo(f"{job_id} already {before.state}; nothing to cancel")
            return
        info = client.cancel(job_id)
        if info.state == JobState.CANCELLED:
            typer.echo(f"{job_id} CANCELLED")
        else:
            typer.echo(f"{job_id} cancelling (its workers are stopping; it is {info.state} now)")


@app.command()
def scale(job_id: JobArg,
          workers: Annotated[int, typer.Option("--workers", "-n", min=1, help="The job's size from now on, "
                                                                               "within its workers.min..workers.max.")],
          server: ServerOpt = DEFAULT_SERVER, token_file: TokenFileOpt = None, tls_ca: TlsCaOpt = None) -> None:
    """Grow or shrink an elastic job (one whose spec says workers: {min: A, max: B}): a running
    job changes size at its next step boundary, a queued one starts at most that large."""
    with _session(server, token_file, tls_ca) as client:
        info = client.scale(job_id, workers)
        now = f"; it runs on {info.size} now" if info.size else ""
        typer.echo(f"{job_id} scaled to {info.target_size} workers{now}")


@app.command()
def logs(
    job_id: JobArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until the job ends.")
    ] = False,
    server: ServerOpt = DEFAULT_SERVER,
    token_file: TokenFileOpt = None,
    tls_ca: TlsCaOpt = None,
) -> None:
    """Print a job's log: submission, evaluations, checkpoints, restarts, its end."""
    with _session(server, token_file, tls_ca) as client, contextlib.suppress(KeyboardInterrupt):
        for line in client.logs(job_id, follow=follow):
            typer.echo(line)


@app.command()
def demo(
    workers: Annotated[int, typer.Option(min=1, max=8, help="Workers.")] = 2,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training set.")] = 20,
    mode: Annotated[str, typer.Option(help="ps-sync, ps-async, ps-ssp or allreduce.")] = "ps-sync",
    data_dir: Annotated[
        Path | None,
        typer.Option(file_okay=False, help="The server's data (default: a temporary folder)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="FILE",
                     help="Where the checkpoint goes (default: <job>-step<step>.safetensors here)."),
    ] = None,
) -> None:
    """Train an MLP on the built-in digits set with 2 ps-sync workers (or --mode) on an embedded server."""
    with _edge():
        try:
            run_demo(workers=workers, epochs=epochs, data_dir=data_dir, out=out, console=_stdout(), mode=mode)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None


# --- sweeps: `gradhub sweep`, `gradhub sweeps`, and what status, pull and cancel do with a sweep id ---


def is_sweep_id(name: str) -> bool:
    """Sweep ids start with ``s-`` (job ids with ``j-``)."""
    return name.startswith("s-")


@app.command("sweep")
def sweep_command(
    sweep_file: Annotated[
        Path,
        typer.Argument(metavar="SWEEP.yaml", exists=True, dir_okay=False, readable=True,
                       help="The sweep: a job (inline, or `base: job.yaml`), a search, a space, an objective "
                            "(see README, Sweeps)."),
    ],
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Follow the leaderboard until the sweep ends.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="With --wait: give up after this many seconds.")
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token_file: TokenFileOpt = None,
    tls_ca: TlsCaOpt = None,
) -> None:
    """Start a hyperparameter sweep and print its id; with --wait, follow it and print the best trial."""
    from gradhub.client.sweep_view import sweep_details
    from gradhub.proto.contract.sweep import SweepSpec

    with _session(server, token_file, tls_ca) as client:
        handle = client.sweep(SweepSpec.from_yaml(sweep_file))
        typer.echo(handle.id)
        if not wait:
            return
        console = Console(stderr=True, highlight=False, soft_wrap=True)
        try:
            with Live(console=console, auto_refresh=False, transient=False) as live:
                for info in client.watch_sweep(handle.id, timeout=timeout):
                    live.update(sweep_details(info), refresh=True)
        except KeyboardInterrupt:
            typer.echo(f"{handle.id} keeps running on the server; follow it with "
                       f"`gradhub status {handle.id} --watch`", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        typer.echo(_sweep_final_line(handle.wait(timeout=timeout)))


def _sweep_final_line(info: Any) -> str:
    best = info.best_trial
    params = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(best.params.items()))
    return f"{info.id} {info.state}: best trial {best.number} ({best.job_id}) {info.metric} {number(best.value)}; {params}"


@app.command("sweeps")
def sweeps_command(server: ServerOpt = DEFAULT_SERVER, token_file: TokenFileOpt = None,
                   tls_ca: TlsCaOpt = None) -> None:
    """A table of sweeps (`gradhub status SWEEP` shows one's leaderboard)."""
    from gradhub.client.sweep_view import sweeps_table

    with _session(server, token_file, tls_ca) as client:
        sweeps = client.list_sweeps()
        _stdout().print(sweeps_table(sweeps) if sweeps else "no sweeps")


def _sweep_status(sweep_id: str, watch: bool, as_json: bool, server: str, token_file: Path | None,
                  tls_ca: Path | None) -> None:
    """`gradhub status SWEEP`: the leaderboard; --json with the best trial's metrics; --watch."""
    from gradhub.client.sweep_view import sweep_details

    console = _stdout()
    with _session(server, token_file, tls_ca) as client:
        if not watch:
            info = client.get_sweep(sweep_id)
            if as_json:
                typer.echo(json.dumps(info.to_dict(), indent=2))
            else:
                console.print(sweep_details(info))
            return
        with contextlib.suppress(KeyboardInterrupt):
            if as_json:
                for info in client.watch_sweep(sweep_id):
                    typer.echo(json.dumps(info.to_dict()))
                return
            with Live(console=console, auto_refresh=False) as live:
                for info in client.watch_sweep(sweep_id):
                    live.update(sweep_details(info), refresh=True)


def _pull_best(sweep_id: str, output: Path | None, best: bool, step: int | None, server: str,
               token_file: Path | None, tls_ca: Path | None) -> None:
    """`gradhub pull SWEEP --best`: the best completed trial's final checkpoint."""
    if not best:
        _fail(f"{sweep_id} is a sweep: pull its best trial with --best (or pull a trial's job by its id)", 2)
    if not is_sweep_id(sweep_id):
        _fail(f"--best: {sweep_id} is a job; --best takes a sweep id (s-...)", 2)
    if step is not None:
        _fail("--best: pulls the best trial's final checkpoint; --step takes a job id", 2)
    with _session(server, token_file, tls_ca) as client:
        info = client.get_sweep(sweep_id)
        trial = info.best_trial
        if trial is None:
            raise NotFoundError(f"sweep {sweep_id!r} has no completed trial yet ({info.state})")
        steps = [c.step for c in client.list_checkpoints(trial.job_id)]
        if not steps:
            raise NotFoundError(f"the best trial's job {trial.job_id!r} has no checkpoints")
        if output is None or output.is_dir():
            output = (output or Path()) / checkpoint_filename(f"{sweep_id}-best-{trial.job_id}", max(steps))
        meta = client.pull_checkpoint(trial.job_id, output, step=max(steps))
        typer.echo(f"{output}  trial {trial.number} ({trial.job_id}) {info.metric} {number(trial.value or 0.0)}  "
                   f"step {meta.step}  sha256 {meta.sha256} (verified)")


def _cancel_sweep(sweep_id: str, server: str, token_file: Path | None, tls_ca: Path | None) -> None:
    with _session(server, token_file, tls_ca) as client:
        before = client.get_sweep(sweep_id)
        if before.done:
            typer.echo(f"{sweep_id} already {before.state}; nothing to cancel")
            return
        info = client.cancel_sweep(sweep_id)
        typer.echo(f"{sweep_id} {info.state} (its running trials' jobs are cancelled)")


def main() -> None:
    """The ``gradhub`` console script."""
    app()


if __name__ == "__main__":
    main()
