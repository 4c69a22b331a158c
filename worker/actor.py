"""The worker as a Ray actor: a thin shell that builds a PSClient inside its own process and runs the loop."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict
from typing import Any

from gradhub.client.spec import JobSpec
from gradhub.proto.alloc import tune_for_streaming
from gradhub.worker.loop import PSTrainer
from gradhub.worker.ps_client import PSClient


class WorkerActor:
    """Wrapped with ``ray.remote`` by the server's launcher; holds nothing but its arguments.

    Ray may restart the actor after its process dies; ``run`` is then called again
    and the worker resumes where the server says.
    """

    def __init__(self, job_id: str, rank: int, spec_json: str, server_address: str,
                 token: str | None = None) -> None:
        self.job_id, self.rank = job_id, rank
        self.spec_json, self.server_address, self.token = spec_json, server_address, token

    def info(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid()}

    def run(self) -> dict[str, Any]:
        tune_for_streaming()
        spec = JobSpec.from_json(self.spec_json)
        # the channel is created here, inside the actor's process, never inherited
        with PSClient(self.server_address, self.job_id, self.rank, spec.compression, self.token) as client:
            return asdict(PSTrainer(spec, self.rank, client).run())
