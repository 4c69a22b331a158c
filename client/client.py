"""The Python client: submit jobs, watch them, cancel them and pull their checkpoints.

    client = Client("localhost:50051")
    job = client.submit(JobSpec.from_yaml("job.yaml"))
    job.wait(progress=True)
    client.pull_checkpoint(job.id, "model.safetensors")
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import grpc

from gradhub.client.sweeps import Sweep, SweepInfo, TrialInfo
from gradhub.proto.channels import SYSTEM_TRUST, open_channel
from gradhub.proto.contract.errors import (
    AuthError,
    GradhubError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    ServerUnavailableError,
    SpecError,
    StateError,
    from_rpc_error,
)
from gradhub.proto.contract.spec import WORKING_DIR_LIMIT, JobSpec
from gradhub.proto.contract.states import JobState
from gradhub.proto.contract.sweep import SweepSpec
from gradhub.proto.v1 import jobs_pb2, jobs_pb2_grpc, sweeps_pb2, sweeps_pb2_grpc

DEFAULT_ADDRESS = "localhost:50051"
RPC_TIMEOUT_S = 30.0
TERMINAL = tuple(s for s in JobState if s.terminal)


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    state: str
    step: int
    staleness: int
    max_staleness: int
    host: str
    restarts: int
    pid: int
    transport: str = ""  # ps modes: "shm", "unix" or "tcp" (the data plane) or "grpc"
    local_step: int = 0  # local-sgd: inner steps so far (``step`` counts rounds)


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a running job's parameter server (``ps_shards`` > 1)."""

    index: int
    host: str
    first: int  # the slice of the flat parameters it holds: [first, end)
    end: int
    version: int
    bytes_in: int
    bytes_out: int
    updates_per_s: float
    pid: int = 0


@dataclass(frozen=True)
class JobInfo:
    """A snapshot of a job as the server reports it."""

    id: str
    name: str
    mode: str
    state: JobState
    reason: str
    step: int
    total_steps: int
    version: int
    metrics: dict[str, float]
    samples_per_second: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    workers: tuple[WorkerInfo, ...] = ()
    spec: dict[str, Any] = field(default_factory=dict)  # empty in list_jobs' summaries
    world_size: int = 0  # the spec's workers (in summaries too)
    owner: str = ""  # the user who submitted it ("" without a tokens file)
    tensorboard_dir: str = ""  # on the server's machine (get_job only)
    # an elastic job (workers: {min, max}): its size now (0 until it runs), the size it is
    # scaled to and its smallest; all 0 for a job of fixed size
    size: int = 0
    target_size: int = 0
    min_workers: int = 0
    shards: tuple[ShardInfo, ...] = ()  # ps_shards > 1, while it runs

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    @classmethod
    def from_proto(cls, p: jobs_pb2.Job) -> JobInfo:
        return cls(
            id=p.id, name=p.name, mode=p.mode, state=JobState(jobs_pb2.JobState.Name(p.state)), reason=p.reason,
            step=p.step, total_steps=p.total_steps, version=p.version, metrics=dict(p.metrics),
            samples_per_second=p.samples_per_second, created_at=p.created_at,
            started_at=p.started_at or None, finished_at=p.finished_at or None,
            workers=tuple(WorkerInfo(w.rank, w.state, w.step, w.staleness, w.max_staleness, w.host,
                                     w.restarts, w.pid, w.transport, w.local_step) for w in p.workers),
            spec=json.loads(p.spec_json) if p.spec_json else {}, world_size=p.world_size, owner=p.owner,
            tensorboard_dir=p.tensorboard_dir, size=p.size, target_size=p.target_size, min_workers=p.min_workers,
            shards=tuple(ShardInfo(s.index, s.host, s.first, s.end, s.version, s.bytes_in, s.bytes_out,
                                   s.updates_per_s, s.pid) for s in p.shards),
        )

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class CheckpointMeta:
    job_id: str
    step: int
    version: int
    size_bytes: int
    sha256: str
    created_at: float


@dataclass(frozen=True)
class MetricPoint:
    """One point of a job's curves (``Client.metrics``)."""

    seq: int
    step: int
    kind: str  # "train" or "eval"
    metrics: dict[str, float]
    at: float  # when the server got it (Unix time)


def _translate(e: grpc.RpcError, what: str) -> GradhubError:
    """The server's error as the class it raised (from the trailing metadata); by status code
    when there is none (a server that is down, the token interceptor)."""
    code, details = e.code(), e.details() or ""
    rebuilt = from_rpc_error(e)
    if rebuilt is not None:
        return rebuilt
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailableError(f"{what}: server unavailable ({details})")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(f"{what}: {details} (pass token=, or set GRADHUB_TOKEN for Client.from_env())")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field_, _, problem = details.partition(": ")
        return SpecError(field_, problem) if problem else SpecError("spec", details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return StateError(details)
    return GradhubError(f"{what}: {code.name}: {details}")


class Client:
    """A connection to one gradhub server at ``address`` (host:port), with a bearer ``token`` when
    the server asks for one (its token, or a user's from its tokens file). ``tls``: the server
    speaks TLS (``--tls-cert``); it is verified against ``tls_ca`` (a PEM file, or its bytes:
    the server's own certificate when self-signed), else the system's CAs. Reads nothing from
    the environment: ``Client.from_env()`` does."""

    def __init__(self, address: str, token: str | None = None, timeout: float = RPC_TIMEOUT_S, *,
                 tls: bool = False, tls_ca: str | Path | bytes | None = None) -> None:
        self.address = address
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._timeout = timeout
        trust = None
        if tls_ca is not None:
            trust = tls_ca if isinstance(tls_ca, bytes) else _read_ca(Path(tls_ca))
        elif tls:
            trust = SYSTEM_TRUST
        self._channel = open_channel(self.address, [("grpc.max_receive_message_length", 64 << 20)], trust)
        self._stub = jobs_pb2_grpc.JobServiceStub(self._channel)
        self._sweeps = sweeps_pb2_grpc.SweepServiceStub(self._channel)

    @classmethod
    def from_env(cls, address: str | None = None, token: str | None = None,
                 timeout: float = RPC_TIMEOUT_S, *, tls: bool | None = None,
                 tls_ca: str | Path | None = None) -> Client:
        """A client for ``address``, else ``GRADHUB_SERVER``, else localhost:50051, with ``token``,
        else ``GRADHUB_TOKEN``; TLS when ``tls``/``tls_ca`` (else ``GRADHUB_TLS=1`` and
        ``GRADHUB_TLS_CA``) say so: the environment is read here, at the edge."""
        env = os.environ
        return cls(address or env.get("GRADHUB_SERVER") or DEFAULT_ADDRESS,
                   token if token is not None else env.get("GRADHUB_TOKEN") or None, timeout,
                   tls=tls if tls is not None else env.get("GRADHUB_TLS", "") in ("1", "true", "yes"),
                   tls_ca=tls_ca if tls_ca is not None else env.get("GRADHUB_TLS_CA") or None)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, what: str, stub: Any = None) -> Any:
        try:
            return getattr(stub or self._stub, method)(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _translate(e, what) from e

    # ---------------------------------------------------------------- jobs
    def submit(self, spec: JobSpec | Mapping[str, Any]) -> Job:
        spec = JobSpec.coerce(spec)  # validated here, and again by the server
        packed = pack_working_dir(spec.working_dir) if spec.working_dir else b""
        reply = self._call("SubmitJob", jobs_pb2.SubmitJobRequest(spec_json=spec.to_json(),
                                                                  working_dir_zip=packed), "submit")
        return Job(self, JobInfo.from_proto(reply.job))

    def get_job(self, job_id: str) -> JobInfo:
        return JobInfo.from_proto(self._call("GetJob", jobs_pb2.GetJobRequest(job_id=job_id), "status").job)

    def job(self, job_id: str) -> Job:
        return Job(self, self.get_job(job_id))

    def list_jobs(self, page_size: int = 100) -> list[JobInfo]:
        """Every job, in creation order, as summaries (``spec`` is empty: ``get_job`` has it),
        fetched ``page_size`` at a time."""
        jobs, token = [], ""
        while True:
            reply = self._call("ListJobs", jobs_pb2.ListJobsRequest(page_size=page_size, page_token=token), "list")
            jobs += [JobInfo.from_proto(j) for j in reply.jobs]
            token = reply.next_page_token
            if not token:
                return jobs

    def cancel(self, job_id: str) -> JobInfo:
        return JobInfo.from_proto(self._call("CancelJob", jobs_pb2.CancelJobRequest(job_id=job_id), "cancel").job)

    def scale(self, job_id: str, workers: int) -> JobInfo:
        """Scale an elastic job (``workers: {min, max}`` in its spec) to ``workers``: a running
        job grows or shrinks at its next step boundary (growing as far as the cluster has room,
        and on when more frees up), a queued one starts at most that large. SpecError outside
        the spec's bounds or for a job of fixed size."""
        return JobInfo.from_proto(self._call("ScaleJob", jobs_pb2.ScaleJobRequest(job_id=job_id, workers=workers),
                                             "scale").job)

    def delete(self, job_id: str) -> None:
        """Remove a job that has ended, with its log, checkpoints and working dir (StateError while
        it is queued or running: cancel it first)."""
        self._call("DeleteJob", jobs_pb2.DeleteJobRequest(job_id=job_id), "delete")

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[JobInfo]:
        """The job now and at each change, until it ends (or ``timeout`` seconds pass)."""
        try:
            for reply in self._stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=timeout,
                                             metadata=self._metadata):
                yield JobInfo.from_proto(reply.job)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"job {job_id} did not finish within {timeout} s") from e
            raise _translate(e, "watch") from e

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        try:
            for reply in self._stub.GetJobLogs(jobs_pb2.GetJobLogsRequest(job_id=job_id, follow=follow),
                                               metadata=self._metadata):
                yield from reply.lines
        except grpc.RpcError as e:
            raise _translate(e, "logs") from e

    def metrics(self, job_id: str, after: int = 0) -> list[MetricPoint]:
        """The job's curves: train points (at most one a second) and every evaluation, oldest
        first; ``after``: only points past that ``seq`` (to follow a running job)."""
        reply = self._call("GetJobMetrics", jobs_pb2.GetJobMetricsRequest(job_id=job_id, after=after), "metrics")
        return [MetricPoint(p.seq, p.step, p.kind, dict(p.metrics), p.at) for p in reply.points]

    # ---------------------------------------------------------- checkpoints
    def list_checkpoints(self, job_id: str) -> list[CheckpointMeta]:
        reply = self._call("ListCheckpoints", jobs_pb2.ListCheckpointsRequest(job_id=job_id), "checkpoints")
        return [_ckpt(c) for c in reply.checkpoints]

    def pull_checkpoint(self, job_id: str, path: str | Path, step: int | None = None) -> CheckpointMeta:
        """Download a checkpoint (the latest, or ``step``) to ``path``; verifies its sha256.

        The file is written next to ``path`` and renamed into place only once verified.
        """
        path = Path(path)
        request = jobs_pb2.PullCheckpointRequest(job_id=job_id)
        if step is not None:
            request.step = step
        digest = hashlib.sha256()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                stream = self._stub.PullCheckpoint(request, timeout=600, metadata=self._metadata)
                first = next(stream)
                if first.WhichOneof("kind") != "info":
                    raise GradhubError("pull: the server's stream did not start with the checkpoint's info")
                meta = _ckpt(first.info)
                for chunk in stream:
                    digest.update(chunk.data)
                    f.write(chunk.data)
            if digest.hexdigest() != meta.sha256:
                raise GradhubError(f"pull: sha256 mismatch for {job_id} step {meta.step}: got "
                                   f"{digest.hexdigest()}, the server says {meta.sha256}")
            os.replace(tmp, path)
            return meta
        except grpc.RpcError as e:
            raise _translate(e, "pull") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # --------------------------------------------------------------- sweeps
    def sweep(self, spec: SweepSpec | Mapping[str, Any]) -> Sweep:
        """Start a sweep (its trials are jobs of yours); ``SweepSpec.from_yaml`` reads a sweep file."""
        spec = spec if isinstance(spec, SweepSpec) else SweepSpec.from_dict(spec)  # validated here and again there
        packed = pack_working_dir(spec.job.working_dir) if spec.job.working_dir else b""
        reply = self._call("SubmitSweep", sweeps_pb2.SubmitSweepRequest(spec_json=spec.to_json(), working_dir_zip=packed),
                           "sweep", self._sweeps)
        return Sweep(self, SweepInfo.from_proto(reply.sweep))

    def get_sweep(self, sweep_id: str) -> SweepInfo:
        """The sweep with its trials as a leaderboard (best first)."""
        return SweepInfo.from_proto(self._call("GetSweep", sweeps_pb2.GetSweepRequest(sweep_id=sweep_id), "status",
                                               self._sweeps).sweep)

    def list_sweeps(self) -> list[SweepInfo]:
        """Every sweep, in creation order, as summaries (no trials)."""
        reply = self._call("ListSweeps", sweeps_pb2.ListSweepsRequest(), "list", self._sweeps)
        return [SweepInfo.from_proto(s) for s in reply.sweeps]

    def cancel_sweep(self, sweep_id: str) -> SweepInfo:
        """Cancel the sweep's running trials and end it."""
        reply = self._call("CancelSweep", sweeps_pb2.CancelSweepRequest(sweep_id=sweep_id), "cancel", self._sweeps)
        return SweepInfo.from_proto(reply.sweep)

    def watch_sweep(self, sweep_id: str, timeout: float | None = None) -> Iterator[SweepInfo]:
        """The sweep now and at each change, until it ends (or ``timeout`` seconds pass)."""
        try:
            for reply in self._sweeps.WatchSweep(sweeps_pb2.WatchSweepRequest(sweep_id=sweep_id), timeout=timeout,
                                                 metadata=self._metadata):
                yield SweepInfo.from_proto(reply.sweep)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"sweep {sweep_id} did not finish within {timeout} s") from e
            raise _translate(e, "watch") from e

    def pull_best(self, sweep_id: str, path: str | Path) -> tuple[TrialInfo, CheckpointMeta]:
        """Download the best completed trial's final checkpoint to ``path``; that trial and the checkpoint."""
        info = self.get_sweep(sweep_id)
        best = info.best_trial
        if best is None:
            raise NotFoundError(f"sweep {sweep_id!r} has no completed trial yet ({info.state})")
        return best, self.pull_checkpoint(best.job_id, path)


def _read_ca(path: Path) -> bytes:
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise GradhubError(f"tls_ca: cannot read {path} ({e.strerror or e})") from e
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise GradhubError(f"tls_ca: {path} holds no PEM certificate")
    return pem


def _ckpt(c: jobs_pb2.CheckpointInfo) -> CheckpointMeta:
    return CheckpointMeta(c.job_id, c.step, c.version, c.size_bytes, c.sha256, c.created_at)


class Job:
    """A handle on a submitted job."""

    def __init__(self, client: Client, info: JobInfo) -> None:
        self.client, self.info = client, info

    @property
    def id(self) -> str:
        return self.info.id

    def refresh(self) -> JobInfo:
        self.info = self.client.get_job(self.id)
        return self.info

    def wait(self, timeout: float | None = None, progress: bool = False) -> JobInfo:
        """Block until the job ends; raises JobFailedError when it FAILED or was CANCELLED."""
        if progress:
            from gradhub.client.progress import watch_with_progress

            self.info = watch_with_progress(self.client, self.id, timeout)
        else:
            for info in self.client.watch(self.id, timeout=timeout):
                self.info = info
        if self.info.state != JobState.SUCCEEDED:
            raise JobFailedError(f"job {self.id} {self.info.state}: {self.info.reason or 'no reason given'}")
        return self.info

    def cancel(self) -> JobInfo:
        self.info = self.client.cancel(self.id)
        return self.info

    def scale(self, workers: int) -> JobInfo:
        """``Client.scale`` of this job."""
        self.info = self.client.scale(self.id, workers)
        return self.info

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, state={self.info.state!r}, step={self.info.step}/{self.info.total_steps})"


def pack_working_dir(path: str | os.PathLike[str], limit: int = WORKING_DIR_LIMIT) -> bytes:
    """Zip a local folder for a job's ``working_dir`` (skipping caches and VCS folders)."""
    root = Path(path)
    if not root.is_dir():
        raise SpecError("working_dir", f"{str(root)!r} is not a folder")
    buf = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(root.rglob("*")):
            rel = file.relative_to(root)
            if any(part in (".git", "__pycache__", ".venv") for part in rel.parts) or not file.is_file():
                continue
            total += file.stat().st_size
            if total > limit:
                raise SpecError("working_dir", f"{str(root)!r} holds more than {_size(limit)}; "
                                "keep data out of it or load it from shared storage")
            zf.write(file, rel.as_posix())
    data = buf.getvalue()
    if len(data) > limit:
        raise SpecError("working_dir", f"packed size {_size(len(data))} exceeds {_size(limit)}")
    return data


def _size(nbytes: int) -> str:
    """``100 MiB``, ``1.5 MiB``; below 1 MiB in bytes (``limit >> 20`` printed a small limit as 0)."""
    return f"{nbytes / 2**20:.3g} MiB" if nbytes >= 1 << 20 else f"{nbytes} bytes"
