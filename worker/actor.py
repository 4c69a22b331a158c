"""The worker as a Ray actor: a thin shell that builds a ServerLink inside its own process and runs the loop."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict
from typing import Any

from gradhub.proto.alloc import tune_for_streaming
from gradhub.proto.contract.spec import JobSpec
from gradhub.worker.server_link import ServerLink


class WorkerActor:
    """Wrapped with ``ray.remote`` by the server's launcher; holds its arguments and, once
    ``prepare``d, the job's workload (model and data, built as every rank builds them).

    Ray may restart the actor after its process dies; ``run`` is then called again and the
    worker resumes where the server says (ps modes), or joins its group's next generation
    and takes a survivor's state (allreduce). A spare (``rank`` -1) prepares itself and waits;
    ``run_as`` makes it the worker of a rank whose process died.
    """

    def __init__(self, job_id: str, rank: int, spec_json: str, server_address: str,
                 tls_ca: bytes | None = None, credential: str = "") -> None:
        self.job_id, self.rank = job_id, rank
        self.spec_json, self.server_address = spec_json, server_address
        self.tls_ca = tls_ca  # the server's TLS: what to trust (None: plaintext)
        self.credential = credential  # the job's: the server takes this worker's calls only with it
        self._work: Any = None

    def prepare(self) -> None:
        """Build the workload now (imports, model, data), so that a run starts training at once."""
        from gradhub.worker.allreduce import AllReduceTrainer  # noqa: F401 - imported ahead of the run
        from gradhub.worker.loop import PSTrainer  # noqa: F401
        from gradhub.worker.workload import Workload

        if self._work is None:
            spec = JobSpec.from_json(self.spec_json)
            self._work = Workload.build(spec, max(self.rank, 0))
            # a first optimizer imports what torch.optim loads lazily (torch._dynamo: about two
            # seconds of CPU); only a worker that steps an optimizer itself pays for it (in the
            # ps-* modes the server steps it)
            if spec.worker_steps_optimizer and any(p.requires_grad for p in self._work.model.parameters()):
                self._work.build_optimizer()

    def run_as(self, rank: int) -> dict[str, Any]:
        """A spare takes over worker ``rank``."""
        self.rank = rank
        return self.run()

    def info(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid()}

    def run(self) -> dict[str, Any]:
        import dataclasses

        tune_for_streaming()
        spec = JobSpec.from_json(self.spec_json)
        work = None if self._work is None else dataclasses.replace(self._work, rank=self.rank)
        self._work = None  # a run changes the model: a later run of this process builds afresh
        # the channel is created here, inside the actor's process, never inherited
        with ServerLink(self.server_address, self.job_id, self.rank, spec.compression, spec.transport,
                        self.credential, self.tls_ca, spec.compression_block, bool(spec.error_feedback)) as client:
            if spec.mode == "local-sgd":
                from gradhub.worker.local_sgd import LocalSGDTrainer

                return asdict(LocalSGDTrainer(spec, self.rank, client, work).run())
            if spec.is_ps:
                from gradhub.worker.loop import PSTrainer

                return asdict(PSTrainer(spec, self.rank, client, work).run())
            _bind_collectives_to_node()
            from gradhub.worker.allreduce import AllReduceTrainer

            return asdict(AllReduceTrainer(spec, self.rank, client, work).run())


def _bind_collectives_to_node() -> None:
    """Gloo and NCCL pick their network interface from the environment or the hostname; the
    hostname can resolve to a loopback or another host's address (containers, network
    namespaces). Unless the user chose one, use the interface of the address Ray uses for
    this node, as the other nodes reach it."""
    import ray

    from gradhub.worker.collective import interface_of

    iface = interface_of(ray.util.get_node_ip_address())
    if iface is not None and not iface.startswith("lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
