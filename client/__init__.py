"""gradhub's user surface: the job spec, the Python client and the errors it raises.

    from gradhub.client import Client, JobSpec
"""

from gradhub.client.client import CheckpointMeta, Client, Job, JobInfo, WorkerInfo
from gradhub.client.sweeps import Sweep, SweepInfo, TrialInfo
from gradhub.proto.contract.errors import (
    AuthError,
    GradhubError,
    JobFailedError,
    NotFoundError,
    ServerUnavailableError,
    SpecError,
)
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.contract.sweep import SweepSpec

__all__ = [
    "AuthError",
    "CheckpointMeta",
    "Client",
    "GradhubError",
    "Job",
    "JobFailedError",
    "JobInfo",
    "JobSpec",
    "NotFoundError",
    "ServerUnavailableError",
    "SpecError",
    "Sweep",
    "SweepInfo",
    "SweepSpec",
    "TrialInfo",
    "WorkerInfo",
]
