"""``gradhub demo``: an embedded server on a local Ray trains a small MLP on the built-in digits
data set with synchronous parameter-server workers, then pulls the trained checkpoint."""

from __future__ import annotations

import contextlib
import itertools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from gradhub.client.client import CheckpointMeta, Client, JobInfo
from gradhub.client.progress import spec_summary, watch_with_progress
from gradhub.proto.contract.errors import JobFailedError, NotFoundError
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.contract.states import JobState

HIDDEN = (128,)
DIGITS_TRAIN = 1437  # training samples of the built-in digits set (gradhub.worker.data)
BATCH_SIZE = 32  # per worker
LR = 0.005  # Adam; >= 96 % validation accuracy after 20 epochs, where 0.001 stalls near 95 %
JOB_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DemoResult:
    job: JobInfo
    checkpoint: Path
    meta: CheckpointMeta
    server_start_s: float  # Ray and the gRPC server up
    job_s: float  # from submit to the job's end, the workers' start included
    ready_s: float  # from the start until the checkpoint was pulled
    wall_s: float  # everything, the server's stop included


def checkpoint_filename(job_id: str, step: int) -> str:
    """The default name of a pulled checkpoint: ``<job>-step<step>.safetensors``."""
    return f"{job_id}-step{step}.safetensors"


def demo_spec(workers: int = 2, epochs: int = 20, mode: str = "ps-sync") -> JobSpec:
    """A ``ps-sync`` job (or ``mode``): ``mlp(hidden=[128])`` on digits, Adam, half a CPU per worker."""
    per_epoch = max(1, DIGITS_TRAIN // (workers * BATCH_SIZE))
    return JobSpec.from_dict({
        "name": "demo-digits",
        "mode": mode,
        "workers": workers,
        "resources": {"cpus": 0.5},
        "model": {"name": "mlp", "args": {"hidden": list(HIDDEN)}},
        "dataset": "digits",
        "optimizer": {"name": "adam", "lr": LR},
        "batch_size": BATCH_SIZE,
        "epochs": epochs,
        "eval_every": 2 * per_epoch,  # validation accuracy every other epoch, and at the end
    })


def run_demo(
    workers: int = 2,
    epochs: int = 20,
    data_dir: Path | None = None,
    out: Path | None = None,
    console: Console | None = None,
    mode: str = "ps-sync",
) -> DemoResult:
    """Start a server (port 0, local Ray), train ``demo_spec``, pull the checkpoint, stop.

    Prints its progress and, before the server stops, the result and how to load the
    checkpoint. ``data_dir``: the server's data (default: a temporary folder, removed
    afterwards). ``out``: the checkpoint's file (default: ``<job>-step<step>.safetensors``
    here). Raises ``JobFailedError`` if the job does not succeed.
    """
    from gradhub.server.app import Server
    from gradhub.server.config import ServerConfig

    console = console or Console(highlight=False, soft_wrap=True)
    spec = demo_spec(workers, epochs, mode)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gradhub-demo-")))
        console.print("starting an embedded gradhub server on a local Ray ...")
        server = stack.enter_context(Server(ServerConfig(port=0, data_dir=data_dir)))
        server_start_s = time.perf_counter() - t0
        console.print(f"server on {server.address} ({server_start_s:.1f} s), data in {data_dir}")
        client = stack.enter_context(Client(server.address))
        t_submit = time.perf_counter()
        job = client.submit(spec)
        console.print(f"job {job.id}: {spec_summary(spec.to_dict())}")
        info = watch_with_progress(client, job.id, timeout=JOB_TIMEOUT_S, console=console)
        job_s = time.perf_counter() - t_submit
        if info.state != JobState.SUCCEEDED:
            raise JobFailedError(f"job {job.id} {info.state}: {info.reason or 'no reason given'}")
        steps = [c.step for c in client.list_checkpoints(job.id)]
        if not steps:
            raise NotFoundError(f"job {job.id!r} succeeded but saved no checkpoint")
        path = out or Path.cwd() / checkpoint_filename(job.id, max(steps))
        meta = client.pull_checkpoint(job.id, path, step=max(steps))
        ready_s = time.perf_counter() - t0
        _print_result(console, info, path, meta, server_start_s, job_s, ready_s)
        console.print("stopping the server ...")
    wall_s = time.perf_counter() - t0
    console.print(f"done in {wall_s:.1f} s")
    return DemoResult(info, path, meta, server_start_s, job_s, ready_s, wall_s)


def _print_result(console: Console, info: JobInfo, path: Path, meta: CheckpointMeta,
                  server_start_s: float, job_s: float, ready_s: float) -> None:
    accuracy = info.metrics.get("val_accuracy")
    acc = "n/a" if accuracy is None else f"{accuracy:.1%}"
    console.print(f"[bold]validation accuracy {acc}[/] after {info.step} steps")
    console.print(f"wall time {ready_s:.1f} s (server start {server_start_s:.1f} s, "
                  f"job {job_s:.1f} s, workers' start included)")
    console.print(f"checkpoint {path} (step {meta.step}, sha256 {meta.sha256})", markup=False)
    console.print("load it in PyTorch:", style="bold")
    widths = [64, *HIDDEN]
    layers = "".join(f"nn.Linear({a}, {b}), nn.ReLU(), " for a, b in itertools.pairwise(widths))
    console.print(
        "    from safetensors.torch import load_file\n"
        "    from torch import nn\n"
        f"    model = nn.Sequential(nn.Flatten(), {layers}nn.Linear({widths[-1]}, 10))"
        f"  # = gradhub.worker.models.mlp(hidden={list(HIDDEN)})\n"
        f"    model.load_state_dict(load_file({str(path)!r}))\n"
        "    model(x).argmax(1)  # x: (N, 64) pixels / 16, or (N, 8, 8)",
        markup=False,
    )
