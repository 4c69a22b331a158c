"""The gradhub server process: an event loop (``gradhub.server.io_loop``) runs the gRPC server
(grpc.aio: the JobService, the WorkerControl and the ParameterServer, the ps modes' gRPC
fallback), another the data plane (the ps modes' tensors, ``gradhub.server.data_plane``), both
backed by the JobManager and connected to Ray (embedded local, or a cluster). Calls that wait
or stream (pulls, push sessions, watches, logs) are coroutines; the other handlers run in
bounded thread pools. Two loops, not one, so that a storm of pushes never delays a
control-plane call (both are asyncio: one concurrency model).

    with Server(ServerConfig(port=0, data_dir=tmp)) as server:
        print(server.address)
"""

from __future__ import annotations

import gc
import logging
from concurrent import futures
from typing import Self

import grpc
import grpc.aio
from prometheus_client import CollectorRegistry

from gradhub.proto.alloc import tune_for_streaming
from gradhub.proto.contract.spec import WORKING_DIR_LIMIT
from gradhub.proto.v1 import jobs_pb2_grpc, sweeps_pb2_grpc
from gradhub.server import embedded_ray
from gradhub.server.auth import Users
from gradhub.server.checkpoints import CheckpointStore
from gradhub.server.config import ServerConfig
from gradhub.server.control_service import WorkerControlServicer
from gradhub.server.control_service import add_to_server as add_control_service
from gradhub.server.dashboard_sweeps import dashboard_routes_with_sweeps
from gradhub.server.data_dir import DataDirLock
from gradhub.server.data_plane import DataPlane
from gradhub.server.flat_optimizer import load_optimizer_machinery
from gradhub.server.io_loop import IOLoop
from gradhub.server.job_db import JobDB
from gradhub.server.job_service import JobServiceServicer
from gradhub.server.jobs import JobManager
from gradhub.server.launcher import Launcher, RayLauncher
from gradhub.server.limits import StreamLimits
from gradhub.server.metrics import RpcCounter, metrics_routes
from gradhub.server.ps_service import ParameterServerServicer
from gradhub.server.ps_service import add_to_server as add_ps_service
from gradhub.server.rpc import AuthInterceptor, WireInterceptor
from gradhub.server.sweep_db import SweepDB
from gradhub.server.sweep_runner import SweepRunner
from gradhub.server.sweep_service import SweepServiceServicer
from gradhub.server.tls import ServerTLS
from gradhub.server.waits import StoreCalls
from gradhub.server.web import WebServer, build_app

log = logging.getLogger(__name__)

# A SubmitJob carries the packed working_dir whole: the client allows up to WORKING_DIR_LIMIT
# (documented as 100 MiB), so the server must take that much plus the spec in one message.
MAX_RECEIVE_BYTES = WORKING_DIR_LIMIT + (4 << 20)
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


# The embedded Ray is one machine, where a worker's connection never drops but with its process:
# a task whose actor went away fails after 100 ms instead of Ray's default wait of about a second
# for the GCS's word on the death, so a dead worker is replaced that much sooner. A cluster
# (--ray-address) keeps its own setting, where a slow network can delay that word.
EMBEDDED_RAY_CONFIG = {"timeout_ms_task_wait_for_death_info": 100}
STORE_THREADS = 4  # where large models' updates run, beside the loop
JOBS_THREADS = 8  # the JobService's own: users' calls never queue behind the workers' traffic


class Server:
    """Start with ``start()`` (or ``with``); ``stop(grace)`` ends it. Nothing runs before ``start``."""

    def __init__(self, config: ServerConfig, launcher: Launcher | None = None) -> None:
        """``launcher`` replaces the Ray launcher (tests that act as the workers themselves)."""
        self.config = config
        self._launcher = launcher
        self._io: IOLoop | None = None
        self._grpc: grpc.aio.Server | None = None
        self._pools: list[futures.ThreadPoolExecutor] = []
        self._limits: StreamLimits | None = None
        self._db: JobDB | None = None
        self._manager: JobManager | None = None
        self._data: DataPlane | None = None
        self._web: WebServer | None = None
        self._sweep_db: SweepDB | None = None
        self._sweeps: SweepRunner | None = None
        self._owns_ray = False
        self._lock = DataDirLock(config.data_dir)
        self.port = 0
        self.advertise_address = ""  # host:port workers use to reach this server (set by start)

    @property
    def address(self) -> str:
        """Where clients reach this server (``host:port``)."""
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def data_port(self) -> int:
        """The data plane's TCP port (0 before ``start``)."""
        return self._data.port if self._data is not None else 0

    @property
    def http_port(self) -> int:
        """The HTTP port (dashboard, /metrics); 0 when the server serves no HTTP."""
        return self._web.port if self._web is not None else 0

    @property
    def manager(self) -> JobManager:
        if self._manager is None:
            raise RuntimeError("server: not started")
        return self._manager

    @property
    def sweeps(self) -> SweepRunner:
        if self._sweeps is None:
            raise RuntimeError("server: not started")
        return self._sweeps

    def start(self) -> Self:
        self._lock.acquire()  # first: a second server on this data dir stops here, before Ray starts
        try:
            return self._start()
        except BaseException:
            self.stop(0)
            raise

    def _start(self) -> Self:
        import ray

        c = self.config
        # the users and the TLS files first: a mistake in them stops the start before Ray does
        users = Users.from_file(c.tokens_file) if c.tokens_file else Users.single(c.token) if c.token else Users.open()
        tls = ServerTLS.load(c.tls_cert, c.tls_key, c.tls_ca) if c.tls_cert and c.tls_key else None
        tune_for_streaming()
        load_optimizer_machinery()  # on this thread, before Ray's and ours start (its docstring)
        if self._launcher is None and not ray.is_initialized():
            if c.ray_address:
                ray.init(address=c.ray_address, log_to_driver=False, logging_level=logging.WARNING)
                if not embedded_ray.cluster_has_token_auth():
                    log.warning("the Ray cluster at %s does not ask for a token: whoever reaches its ports can "
                                "run code on it (start every node with RAY_AUTH_MODE=token and one "
                                "RAY_AUTH_TOKEN_PATH)", c.ray_address)
            else:
                embedded_ray.start(c.ray_num_cpus, EMBEDDED_RAY_CONFIG)
            self._owns_ray = True
        registry = CollectorRegistry()  # this server's metrics (/metrics)
        interceptors = [AuthInterceptor(users), RpcCounter(registry), WireInterceptor()]
        rpc_pool = futures.ThreadPoolExecutor(max_workers=c.max_rpc_threads, thread_name_prefix="gradhub-rpc")
        store_pool = futures.ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="gradhub-apply")
        jobs_pool = futures.ThreadPoolExecutor(max_workers=JOBS_THREADS, thread_name_prefix="gradhub-jobs")
        self._pools = [rpc_pool, store_pool, jobs_pool]
        self._io = io = IOLoop().start()

        async def create() -> tuple[grpc.aio.Server, int]:  # on the loop, which the server binds to
            server = grpc.aio.server(migration_thread_pool=rpc_pool, options=GRPC_OPTIONS, interceptors=interceptors)
            where = f"{_bracket(c.host)}:{c.port}"
            if tls is not None:
                return server, server.add_secure_port(where, tls.grpc_credentials())
            return server, server.add_insecure_port(where)

        self._grpc, self.port = io.run(create(), timeout=30)
        if self.port == 0:
            raise RuntimeError(f"port: could not bind {c.host}:{c.port}")
        calls = StoreCalls(store_pool)
        self.advertise_address = c.advertise_address or f"{_bracket(self._worker_host())}:{self.port}"
        advertise = self.advertise_address
        self._lock.note(f"{_bracket(c.host)}:{self.port}")
        self._db = JobDB(c.data_dir / "jobs.db")
        checkpoints = CheckpointStore(c.data_dir / "checkpoints")
        launcher = self._launcher or RayLauncher(advertise, tls.workers_trust if tls else None)
        self._manager = JobManager(self._db, checkpoints, launcher, c.data_dir / "working_dirs", c, users.quota)
        # the data plane on a loop of its own: a storm of pushes never delays a control-plane call
        self._data = DataPlane(self._manager, c.host, c.data_port, max_model_bytes=c.max_model_bytes,
                               pool=store_pool, tls=tls.ssl_context() if tls else None).start()
        data_host = advertise.rsplit(":", 1)[0].strip("[]")
        self._limits = limits = StreamLimits()  # long-lived streams, per client and in total
        add_control_service(WorkerControlServicer(self._manager, self._data, data_host, limits, c.max_model_bytes),
                            self._grpc)
        add_ps_service(ParameterServerServicer(self._manager, c.max_model_bytes, calls, limits), self._grpc)
        jobs_pb2_grpc.add_JobServiceServicer_to_server(
            JobServiceServicer(self._manager, checkpoints, jobs_pool, limits, users), self._grpc)
        self._sweep_db = SweepDB(c.data_dir / "jobs.db")  # the job database's file, its sweep tables
        self._sweeps = SweepRunner(self._manager, self._sweep_db, c.data_dir / "sweeps")
        sweeps_pb2_grpc.add_SweepServiceServicer_to_server(
            SweepServiceServicer(self._sweeps, self._manager, jobs_pool, users, limits), self._grpc)
        # what is loaded by now (torch, Ray, gradhub: hundreds of thousands of objects) lives as
        # long as the process: kept out of the cyclic collector's full passes, which would
        # otherwise walk all of it and stall every thread for a tenth of a second or more
        # (collected first, so that no garbage is kept; ``stop`` unfreezes)
        if c.http_port is not None:
            app = build_app(users, [*metrics_routes(self._manager, registry),
                                    *dashboard_routes_with_sweeps(self._manager, checkpoints, self._sweeps)])
            self._web = WebServer(app, c.host, c.http_port, tls.ssl_context() if tls else None)
            io.run(self._web.start(), timeout=30)
        gc.collect()
        gc.freeze()
        io.run(self._grpc.start(), timeout=30)
        self._manager.start()
        self._sweeps.start()  # after the manager: it requeued the trials' jobs
        log.info("gradhub server on %s:%d%s (workers reach it at %s)", c.host, self.port, " with TLS" if tls else "",
                 advertise)
        return self

    def _worker_host(self) -> str:
        host = self.config.host
        if host in ("127.0.0.1", "localhost", "::1"):
            return "127.0.0.1"
        if host not in ("0.0.0.0", "::", "[::]", ""):
            return host  # bound to one address: the one workers can reach
        import ray

        return ray.util.get_node_ip_address()

    def stop(self, grace: float = 5.0) -> None:
        if self._sweeps is not None:
            self._sweeps.stop(grace)
        if self._manager is not None:
            self._manager.stop(grace)
        if self._web is not None and self._io is not None:
            self._io.run(self._web.stop(), timeout=grace + 5)
        if self._grpc is not None and self._io is not None:
            self._io.run(self._grpc.stop(grace), timeout=grace + 5)
        if self._data is not None:
            self._data.stop(grace)
        if self._io is not None:
            self._io.stop()
            gc.unfreeze()  # the process may go on without this server (tests, the demo)
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
        if self._sweep_db is not None:
            self._sweep_db.close()
        if self._db is not None:
            self._db.close()
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False
        self._lock.release()
        self._grpc = self._db = self._manager = self._data = self._io = self._web = None
        self._sweeps, self._sweep_db = None, None
        self._pools = []

    def wait(self) -> None:
        """Block until the server stops."""
        if self._grpc is not None and self._io is not None:
            self._io.run(self._grpc.wait_for_termination())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
