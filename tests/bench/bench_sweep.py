"""A sweep with pruning against the same sweep without: time to reach a target accuracy.

    python tests/bench/bench_sweep.py [--trials 8] [--parallel 2] [--steps 400] [--target 0.95] [--out DIR]

One in-process server (port 0, the local Ray it starts) runs both sweeps one after the other:
random search with the same seed over ``optimizer.lr`` (loguniform 1e-6 .. 0.03, Adam: the low
end barely learns) and ``model.args.hidden`` on digits, ``--trials`` trials of ``--steps`` steps,
``--parallel`` at once, evaluated every ``--steps / 10`` steps. Optuna's random sampler ignores
the results, so both sweeps draw the same trials in the same order: the only difference is
``prune: median`` (startup 2) against ``prune: none``.

Figures, each from the server's clock: **time to target**, from the sweep's submission to the
end of the first trial that completed with ``val_accuracy >= --target``; **sweep s**, to the
sweep's end; **trial-job s**, the summed wall time of every trial's job (what the cluster
spent); the best accuracy. The pruned sweep's row gives each figure as a ratio to the unpruned
one (the reference) of the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from report import print_table, write_json  # the script's own folder is on sys.path

NAME = "sweep"
COLUMNS = ["sweep", "prune", "trials complete", "pruned", "best val_accuracy", "time to target s",
           "sweep s", "trial-job s", "time to target ratio", "sweep ratio", "trial-job ratio"]


def sweep_spec(prune: str, trials: int, parallel: int, steps: int, seed: int) -> dict[str, Any]:
    job = {"name": "bench", "mode": "ps-sync", "workers": 1, "resources": {"cpus": 0.5},
           "model": {"name": "mlp", "args": {"hidden": [64]}}, "dataset": "digits",
           "optimizer": {"name": "adam", "lr": 0.01}, "batch_size": 32, "steps": steps, "seed": 1,
           "eval_every": max(1, steps // 10)}
    return {"job": job, "search": "random", "seed": seed, "trials": trials, "parallel": parallel,
            "space": {"optimizer.lr": {"loguniform": [1e-6, 0.03]}, "model.args.hidden": {"choice": [[32], [64]]}},
            "objective": {"metric": "val_accuracy", "mode": "max"},
            "prune": {"name": "median", "startup_trials": 2} if prune == "median" else "none"}


def run_sweep(client: Any, spec: dict[str, Any], target: float) -> dict[str, Any]:
    from gradhub.client.sweeps import Sweep

    handle = client.sweep(spec)
    info = Sweep(client, handle.info).wait(timeout=3600)
    start = info.created_at
    reached = [t.finished_at for t in info.trials
               if t.value is not None and t.value >= target and t.state == "COMPLETE" and t.finished_at]
    job_s = 0.0
    for t in info.trials:
        job = client.get_job(t.job_id)
        if job.started_at and job.finished_at:
            job_s += job.finished_at - job.started_at
    return {
        "sweep": info.id, "prune": spec["prune"] if isinstance(spec["prune"], str) else spec["prune"]["name"],
        "trials complete": sum(t.state == "COMPLETE" for t in info.trials),
        "pruned": sum(t.state == "PRUNED" for t in info.trials),
        "best val_accuracy": info.best_trial.value if info.best_trial else None,
        "time to target s": (min(reached) - start) if reached else None,
        "sweep s": (info.finished_at or time.time()) - start, "trial-job s": job_s,
        "params": [t.params for t in sorted(info.trials, key=lambda t: t.number)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--target", type=float, default=0.95, help="val_accuracy to reach")
    parser.add_argument("--seed", type=int, default=7, help="the random search's seed (both sweeps)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file or folder")
    args = parser.parse_args()

    from gradhub.client.client import Client
    from gradhub.server.app import Server
    from gradhub.server.config import ServerConfig

    rows = []
    with tempfile.TemporaryDirectory(prefix="gradhub-bench-sweep-") as tmp, \
            Server(ServerConfig(port=0, data_dir=Path(tmp), ray_num_cpus=2)) as server, \
            Client(server.address) as client:
        for prune in ("none", "median"):  # the reference first
            rows.append(run_sweep(client, sweep_spec(prune, args.trials, args.parallel, args.steps, args.seed),
                                  args.target))
    reference, pruned = rows
    assert reference["params"] == pruned["params"], "both sweeps must draw the same trials"
    for key, ratio in (("time to target s", "time to target ratio"), ("sweep s", "sweep ratio"),
                       ("trial-job s", "trial-job ratio")):
        ref = reference[key]
        pruned[ratio] = pruned[key] / ref if ref and pruned[key] is not None else None
        reference[ratio] = 1.0 if ref else None
    print_table(f"sweep: {args.trials} trials of {args.steps} steps, {args.parallel} at once, "
                f"target val_accuracy {args.target}", rows, COLUMNS)
    path = write_json(NAME, {"args": vars(args) | {"out": str(args.out)}, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
