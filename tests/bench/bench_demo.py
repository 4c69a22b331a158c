"""The demo task end to end: ``gradhub demo`` against the same training in plain PyTorch and in
Ray Train.

    python tests/bench/bench_demo.py [--epochs 20] [--repeats 1] [--out DIR]

The task is ``gradhub.client.demo.demo_spec()``: ``mlp(hidden=[128])`` on the digits set, Adam,
2 workers of batch 32 (a global batch of 64), 20 epochs. Every method runs in a fresh process
and is timed from that process's start to its end, as a user would wait for it:

- **gradhub demo**: the ``gradhub demo`` command (local Ray, the server, 2 ps-sync workers,
  pulling the checkpoint, stopping); its accuracy and its own time split are read from its output.
- **plain PyTorch**: one process, the same model, optimizer, seed and global batches
  (``global_batch_indices``), so by ps-sync's exactness its accuracy should be the demo's.
- **Ray Train**: ``TorchTrainer`` with 2 workers of batch 32 (DDP over Gloo), the same model,
  optimizer and epochs, with a ``DistributedSampler``; only if ``ray.train.torch`` imports
  (``pip install "ray[train]"``, not a gradhub dependency), else the row says "not installed".

Ratios are wall times over plain PyTorch's, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import print_table, write_json  # the script's own folder is on sys.path
from rich.markup import escape

NAME = "demo"
TIMEOUT_S = 900
RESULT = "BENCH_RESULT "  # a child's last line: this prefix, then JSON
COLUMNS = ["method", "wall s", "training s", "val accuracy", "ratio to plain PyTorch", "detail"]


# --- the children: each runs one method and prints its result ---------------------------------


def _task(epochs: int) -> dict[str, Any]:
    """The demo's job as plain numbers (from demo_spec itself, not a copy of it)."""
    from gradhub.client.demo import demo_spec

    spec = demo_spec(epochs=epochs)
    assert spec.model.name == "mlp" and spec.optimizer.name == "adam" and spec.dataset.name == "digits"
    return {"hidden": list(spec.model.args["hidden"]), "lr": spec.optimizer.lr, "workers": spec.workers,
            "batch_size": spec.batch_size, "epochs": spec.epochs, "seed": spec.seed,
            "eval_every": spec.eval_every, "spec": spec}


def child_plain(epochs: int) -> dict[str, Any]:
    """Single-process PyTorch on the demo's global batches (what ps-sync must equal)."""
    import torch
    from torch import nn

    from gradhub.worker.data import digits, evaluate, get_batch, global_batch_indices
    from gradhub.worker.models import mlp

    task = _task(epochs)
    train, val = digits()
    steps = task["spec"].total_steps(len(train))
    t0 = time.perf_counter()
    torch.manual_seed(task["seed"])
    model = mlp(hidden=task["hidden"])
    opt = torch.optim.Adam(model.parameters(), lr=task["lr"])
    loss_fn = nn.CrossEntropyLoss()
    global_batch = task["workers"] * task["batch_size"]
    for step in range(steps):
        if task["eval_every"] and step and step % task["eval_every"] == 0:
            evaluate(model, val, loss_fn)  # the demo's rank 0 evaluates as often
        x, y = get_batch(train, global_batch_indices(len(train), global_batch, task["seed"], step))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    metrics = evaluate(model, val, loss_fn)
    return {"train_s": time.perf_counter() - t0, "accuracy": metrics["val_accuracy"], "steps": steps,
            "detail": f"1 process, {torch.get_num_threads()} threads, {steps} steps of {global_batch}"}


def _ray_train_loop(config: dict[str, Any]) -> None:
    """Each Ray Train worker: DDP, a DistributedSampler shard, batch 32; rank 0 writes the result."""
    import ray.train
    import ray.train.torch
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler

    from gradhub.worker.data import digits, evaluate
    from gradhub.worker.models import mlp

    train, val = digits()
    torch.manual_seed(config["seed"])
    model = ray.train.torch.prepare_model(mlp(hidden=config["hidden"]))
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    loss_fn = nn.CrossEntropyLoss()
    ctx = ray.train.get_context()
    sampler = DistributedSampler(train, num_replicas=ctx.get_world_size(), rank=ctx.get_world_rank(),
                                 shuffle=True, seed=config["seed"], drop_last=True)
    loader = DataLoader(train, batch_size=config["batch_size"], sampler=sampler, drop_last=True)
    t0 = time.perf_counter()
    steps = 0
    for epoch in range(config["epochs"]):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            steps += 1
    train_s = time.perf_counter() - t0
    if ctx.get_world_rank() == 0:
        # a file, not ray.train.report: Ray Train v2 keeps reported metrics only with checkpoints
        metrics = evaluate(model.module if hasattr(model, "module") else model, val, loss_fn)
        Path(config["result_file"]).write_text(json.dumps(
            {"val_accuracy": metrics["val_accuracy"], "train_s": train_s, "steps": steps}))


def child_ray_train(epochs: int) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    task = _task(epochs)
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-demo-raytrain-") as storage:
            result_file = Path(storage) / "result.json"  # one machine: the workers see this folder
            config = {**{k: task[k] for k in ("hidden", "lr", "batch_size", "epochs", "seed")},
                      "result_file": str(result_file)}
            trainer = TorchTrainer(
                _ray_train_loop, train_loop_config=config,
                scaling_config=ScalingConfig(num_workers=task["workers"], use_gpu=False,
                                             resources_per_worker={"CPU": 0.5}),  # as the demo's workers
                run_config=RunConfig(storage_path=storage, name="bench-demo"),
            )
            trainer.fit()
            m = json.loads(result_file.read_text())
    finally:
        ray.shutdown()
    return {"train_s": m["train_s"], "accuracy": m["val_accuracy"], "steps": m["steps"],
            "detail": f"TorchTrainer, {task['workers']} workers x batch {task['batch_size']}, DDP (gloo), "
                      f"{m['steps']} steps each"}


def run_child(method: str, epochs: int) -> None:
    result = {"plain": child_plain, "ray-train": child_ray_train}[method](epochs)
    print(RESULT + json.dumps(result), flush=True)


# --- the parent: starts each method in a fresh process and times it --------------------------


def _timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    """Run ``cmd``; (seconds from its start to its end, its output). Raises on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "COLUMNS": "200"}, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}:\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def measure_demo(epochs: int, tmp: Path) -> dict[str, Any]:
    """``gradhub demo`` as a user runs it; accuracy and its time split from what it prints."""
    out = tmp / "demo.safetensors"
    cmd = [sys.executable, "-m", "gradhub.client.cli", "demo", "--epochs", str(epochs),
           "--out", str(out), "--data-dir", str(tmp / "demo-data")]
    wall, stdout = _timed(cmd, tmp)
    accuracy = re.search(r"validation accuracy ([\d.]+)%", stdout)
    split = re.search(r"server start ([\d.]+) s, job ([\d.]+) s", stdout)
    if accuracy is None or split is None or not out.is_file():
        raise RuntimeError(f"gradhub demo: unexpected output:\n{stdout}")
    return {"wall_s": wall, "train_s": float(split[2]), "accuracy": float(accuracy[1]) / 100,
            "detail": f"server start {float(split[1]):.1f} s; training s: submit to end, "
                      "workers' start included"}


def measure_child(method: str, epochs: int, tmp: Path) -> dict[str, Any]:
    wall, stdout = _timed([sys.executable, __file__, "--child", method, "--epochs", str(epochs)], tmp)
    line = next(line for line in reversed(stdout.splitlines()) if line.startswith(RESULT))
    return {"wall_s": wall, **json.loads(line[len(RESULT):])}


def ray_train_available() -> bool:
    """Whether ``ray.train.torch`` imports (checked in a child: a failed import leaves debris)."""
    probe = subprocess.run([sys.executable, "-c", "import ray.train.torch"], capture_output=True,
                           timeout=120, check=False)
    return probe.returncode == 0


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time (the only one when there is one)."""
    walls = sorted(r["wall_s"] for r in runs)
    median = walls[(len(walls) - 1) // 2]
    return next(r for r in runs if r["wall_s"] == median)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="passes over digits (the demo's default: 20)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per method; the median is kept")
    parser.add_argument("--skip-ray-train", action="store_true", help="leave Ray Train out")
    parser.add_argument("--out", type=Path, default=None, help="JSON file or folder")
    parser.add_argument("--child", choices=["plain", "ray-train"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.epochs)
        return

    runs: dict[str, list[dict[str, Any]]] = {}
    not_run: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp_name:
        tmp = Path(tmp_name)
        runs["plain PyTorch"] = [measure_child("plain", args.epochs, tmp) for _ in range(args.repeats)]
        runs["gradhub demo"] = [measure_demo(args.epochs, tmp) for _ in range(args.repeats)]
        if args.skip_ray_train:
            not_run["Ray Train TorchTrainer"] = "skipped (--skip-ray-train)"
        elif not ray_train_available():
            not_run["Ray Train TorchTrainer"] = "not installed: ray.train.torch does not import (the ray[train] extra)"
        else:
            runs["Ray Train TorchTrainer"] = [measure_child("ray-train", args.epochs, tmp)
                                              for _ in range(args.repeats)]
    measured = {method: median_run(r) for method, r in runs.items()}

    plain_wall = measured["plain PyTorch"]["wall_s"]
    rows = [{"method": method, "wall s": round(m["wall_s"], 2), "training s": round(m["train_s"], 2),
             "val accuracy": f"{m['accuracy']:.1%}", "ratio to plain PyTorch": round(m["wall_s"] / plain_wall, 2),
             "detail": escape(m["detail"])} for method, m in measured.items()]
    rows += [{"method": method, "detail": escape(reason)} for method, reason in not_run.items()]
    print_table(f"the demo task ({args.epochs} epochs of digits, global batch 64), "
                "wall time from process start", rows, COLUMNS)
    path = write_json(NAME, {
        "command": " ".join(sys.argv), "epochs": args.epochs, "repeats": args.repeats,
        "results": {**measured, **{k: {"not_run": v} for k, v in not_run.items()}},
        "ratios_to_plain": {k: v["wall_s"] / plain_wall for k, v in measured.items()},
        "runs": runs,
    }, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
