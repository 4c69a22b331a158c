"""Recovery from a worker's death: seconds from a SIGKILL to the first training step after it,
and the job's wall time against the same job undisturbed, in ps-sync and allreduce, with no
spare (Ray restarts the dead worker's process) and with one (``spares: 1``: a prepared actor
takes the dead worker's rank).

The job's dataset (a user factory shipped as working_dir) appends (wall time, pid) to a log on
every sample it reads, so the first read by a process that did not exist before the kill is the
moment the job trains again (in allreduce, the restarted group's first batch). Worker 1 is
killed once it reaches ``--kill-at`` of the job's steps. Everything runs on this machine, so the
workers' and this script's wall clocks are the same clock.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from report import print_table, write_json

NAME = "bench_recovery"
PACKAGE = "gh_bench_recovery"
MODULE = textwrap.dedent("""
    import os
    import time

    from torch.utils.data import Dataset

    from gradhub.worker.data import digits

    _log = None


    class Logged(Dataset):
        def __init__(self, base, path):
            self.base, self.path = base, path

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            global _log
            if _log is None:
                _log = open(self.path, "a", buffering=1)
            _log.write(f"{time.time()} {os.getpid()}\\n")
            return self.base[i]


    def data(log):
        train, val = digits()
        return Logged(train, log), val
""")
COLUMNS = ["mode", "spares", "kill → next step s", "undisturbed wall s", "killed wall s", "extra wall s"]  # + "restart log" in JSON


def _code(root: Path) -> Path:
    (root / PACKAGE).mkdir(parents=True)
    (root / PACKAGE / "__init__.py").write_text(MODULE)
    return root


def _spec(mode: str, code: Path, log: Path, steps: int, spares: int = 0) -> dict[str, Any]:
    return {"name": f"recovery-{mode}", "mode": mode, "workers": 2, "spares": spares, "resources": {"cpus": 0.5},
            "model": {"name": "mlp", "args": {"hidden": [64]}}, "batch_size": 16, "steps": steps,
            "dataset": {"factory": f"{PACKAGE}:data", "args": {"log": str(log)}}, "working_dir": str(code),
            "optimizer": {"name": "adam", "lr": 0.002}, "max_restarts": 3, "seed": 1}


def _reads(log: Path) -> list[tuple[float, int]]:
    out = []
    for line in log.read_text().splitlines():
        t, pid = line.split()
        out.append((float(t), int(pid)))
    return out


def run_once(client: Any, mode: str, spares: int, code: Path, tmp: Path, steps: int,
             kill_at: float) -> dict[str, Any]:
    undisturbed_log, killed_log = tmp / f"{mode}-{spares}-undisturbed.log", tmp / f"{mode}-{spares}-killed.log"
    start = time.time()
    undisturbed = client.submit(_spec(mode, code, undisturbed_log, steps)).wait(timeout=600)
    undisturbed_wall = undisturbed.finished_at - undisturbed.started_at
    job = client.submit(_spec(mode, code, killed_log, steps, spares))
    target = int(steps * kill_at)
    while True:  # polling a remote job's progress: bounded by the job's own timeout
        info = client.get_job(job.id)
        if info.state not in ("QUEUED", "RUNNING"):
            raise RuntimeError(f"the job ended before the kill: {info.state} {info.reason}")
        w = info.workers[1] if len(info.workers) > 1 else None
        if w is not None and w.pid > 0 and w.step >= target:
            break
        if time.time() - start > 600:
            raise RuntimeError("the job did not reach the kill step in 600 s")
        time.sleep(0.005)
    before = {pid for _, pid in _reads(killed_log)}
    killed_at = time.time()
    os.kill(w.pid, signal.SIGKILL)
    info = job.wait(timeout=600)
    after = [t for t, pid in _reads(killed_log) if t > killed_at and pid not in before]
    logs = [line for line in client.logs(job.id) if "died" in line or "restart" in line or "formed" in line]
    return {"mode": mode, "spares": spares, "kill → next step s": min(after) - killed_at if after else float("nan"),
            "undisturbed wall s": undisturbed_wall, "killed wall s": info.finished_at - info.started_at,
            "extra wall s": (info.finished_at - info.started_at) - undisturbed_wall,
            "restart log": " | ".join(line.split(" ", 1)[1][:90] for line in logs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps of each job")
    parser.add_argument("--kill-at", type=float, default=0.45, help="fraction of the steps at the kill")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode (the median is kept)")
    parser.add_argument("--modes", nargs="+", default=["ps-sync", "allreduce"])
    parser.add_argument("--spares", nargs="+", type=int, default=[0, 1], help="spares of the killed job")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from gradhub.client.client import Client
    from gradhub.server.app import Server
    from gradhub.server.config import ServerConfig

    start = time.perf_counter()
    payload: dict[str, Any] = {"command": " ".join(sys.argv)}
    rows = []
    with (tempfile.TemporaryDirectory() as tmp,
          Server(ServerConfig(port=0, data_dir=Path(tmp) / "data")) as server,
          Client(server.address) as client):
        code = _code(Path(tmp) / "code")
        for mode, spares in ((m, s) for m in args.modes for s in args.spares):
            runs = [run_once(client, mode, spares, code, Path(tmp), args.steps, args.kill_at)
                    for _ in range(args.repeats)]
            row = dict(runs[0])
            for column in ("kill → next step s", "undisturbed wall s", "killed wall s", "extra wall s"):
                row[column] = statistics.median(r[column] for r in runs)
            row["runs"] = runs
            rows.append(row)
    print_table(f"worker 1 of 2 SIGKILLed at {args.kill_at:.0%} of {args.steps} steps "
                f"(median of {args.repeats})", rows, COLUMNS)
    payload.update(rows=rows, wall_s=time.perf_counter() - start)
    path = write_json(NAME, payload, args.out)
    print(f"wrote {path} ({payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
