"""The server's update of a push: its optimizer stepped over the store's flat parameter vector
against the same optimizer stepped over the model's tensors (``gradhub.server.flat_optimizer``),
both measured in this run, in this process, through ``ParameterStore.push`` and ``try_pull``
(a 1-worker ps-sync job: each push is a step and its pull the next parameters).

Each push is timed in CPU seconds of this thread, back to back and after a pause (``--pause-ms``,
the rhythm of a job whose worker computes between two pushes: on a small VM whatever runs in
the pause evicts what the update needs, and the cost of a step grows, README (c)). The store
steps the flat vector while every push updates every tensor; one push with an unused tensor
puts it on the tensors for good (as a model with unused weights does), which gives the
reference.

    python tests/bench/bench_server_step.py [--pushes 400] [--pause-ms 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from report import print_table, write_json

from gradhub.proto.v1.tensor_pb2 import FLOAT32
from gradhub.server.store import ParameterStore, StoreConfig
from gradhub.worker.flat import FlatModel
from gradhub.worker.models import cnn, mlp

MODELS = {
    "cnn (6 tensors)": lambda: cnn(),
    "mlp 40x64 (82 tensors)": lambda: mlp(hidden=[64] * 40),
    "mlp 1024x1024 (6 tensors)": lambda: mlp(hidden=[1024, 1024]),
}


def push_cpu_seconds(model: torch.nn.Module, optimizer: str, flat: bool, pushes: int, pause_s: float) -> float:
    """Median CPU seconds of one push + pull of ``model``'s gradient into a 1-worker store."""
    layout = FlatModel(model).layout
    values = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    store = ParameterStore(StoreConfig("bench", "ps-sync", 1, optimizer=optimizer, lr=1e-3))
    store.set_total_steps(pushes + 2)
    store.register(0, host="bench", pid=1)
    store.initialize(layout, values.clone())
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(layout.numel, generator=g) * 1e-3
    # step 0: with an unused tensor for the reference (the store goes over to the tensors)
    store.push(0, 0, 0, grad, unused=() if flat else (0,))
    store.try_pull(0, 1, FLOAT32)
    if store.steps_flat != flat:
        raise RuntimeError(f"the store steps {'the flat vector' if store.steps_flat else 'the tensors'}")
    seconds = []
    for step in range(1, pushes + 1):
        if pause_s:
            time.sleep(pause_s)
        start = time.thread_time()
        store.push(0, step, step, grad)
        store.try_pull(0, step + 1, FLOAT32)
        seconds.append(time.thread_time() - start)
    return statistics.median(seconds[len(seconds) // 10:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=400, help="timed pushes per run")
    parser.add_argument("--pause-ms", type=float, default=3.0, help="the pause before each push, in the paused runs")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each; the median is kept")
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adam"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for label, build in MODELS.items():
        for optimizer in args.optimizers:
            for pause in (0.0, args.pause_ms / 1e3):
                runs: dict[bool, list[float]] = {True: [], False: []}
                for _ in range(args.repeats):  # interleaved: the VM's drift falls on both alike
                    for flat in (False, True):
                        torch.manual_seed(0)
                        runs[flat].append(push_cpu_seconds(build(), optimizer, flat, args.pushes, pause))
                tensors, flat_s = statistics.median(runs[False]), statistics.median(runs[True])
                rows.append({"model": label, "optimizer": optimizer,
                             "pause": f"{pause * 1e3:g} ms" if pause else "none",
                             "tensors ms": f"{tensors * 1e3:.3f}", "flat vector ms": f"{flat_s * 1e3:.3f}",
                             "flat / tensors": f"{flat_s / tensors:.2f}"})
    print_table("the server's push + pull, CPU ms of its thread (median): optimizer over the flat vector vs the "
                "tensors", rows, list(rows[0]))
    print(f"wrote {write_json('server_step', {'rows': rows, 'pushes': args.pushes}, args.out)}")


if __name__ == "__main__":
    main()
