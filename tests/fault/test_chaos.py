"""Chaos: jobs in every mode run at once while their workers and the server are killed at steps
drawn from a seeded random schedule; every job ends SUCCEEDED, the deterministic ones (ps-sync,
allreduce, and the asynchronous modes with one worker) with the parameters of the same job
undisturbed, and every checkpoint survives every kill and loads (in allreduce, one that rank 0
was still sending when it was killed may be missing: ``may_lose``).

The server runs in its own process group with its own Ray (``ServerProcess`` of
test_server_restart): a server kill SIGKILLs it, its Ray and every worker, and a new server on
the same data dir and port resumes the jobs. The kills come from the jobs' data (a package
written into their working_dir): a chosen sample SIGKILLs the worker that reads it (a worker
death), or holds it at a *gate* until the test releases it. A server kill waits until every job
is held at its gate, so it lands mid-run in every job however fast the machine is; the slow
version adds kills at an unguarded moment (whenever a random job passes a random step). Events
sit in the first epoch, where each sample is read at one step only, and fire once (marker
files). The undisturbed references run on the first server beside the jobs, and have ended
before its kill (their checkpoints must survive the kills too).

The short version (default suite) runs one fixed schedule; the slow one runs
``GRADHUB_CHAOS_ROUNDS`` rounds (default 2) of larger ones. ``GRADHUB_CHAOS_SEED`` replays a
schedule (the short version's default is 0, the slow one draws a fresh seed); the seed and the
schedule are printed, and shown with ``-s`` or on failure.
"""

from __future__ import annotations

import math
import os
import random
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from gradhub.client.client import CheckpointMeta, Client, JobInfo
from gradhub.worker.data import steps_per_epoch

from ..conftest import wait_for
from ..server_process import ServerProcess, assert_nothing_left
from .test_exact_kill import BATCH, SEED, TRAIN, first_read_at

SEED_ENV, ROUNDS_ENV = "GRADHUB_CHAOS_SEED", "GRADHUB_CHAOS_ROUNDS"
ENV_SEED = os.environ.get(SEED_ENV)
ROUNDS = int(os.environ.get(ROUNDS_ENV, "2"))
EXACT = 1e-6
JOB_TIMEOUT_S = 240.0
CKPT_EVERY = 8
WORKER_CPUS = 0.1

PACKAGE = "gh_chaos"
MODULE = textwrap.dedent('''
    """Digits whose chosen samples act once on the process that reads them."""
    import os
    import signal
    import time

    from torch.utils.data import Dataset

    GATE_LIMIT_S = 600.0  # a gate nobody releases (the test died) lets the reader go on


    class ChaosDigits(Dataset):
        """``kills``: [sample, marker]: SIGKILL the reader. ``gates``: [sample, arrived, release]:
        say so in ``arrived`` and wait until ``release`` exists."""

        def __init__(self, x, y, kills, gates):
            self.x, self.y = x, y
            self.kills = {int(i): marker for i, marker in kills}
            self.gates = {int(i): (arrived, release) for i, arrived, release in gates}

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            marker = self.kills.get(i)
            if marker is not None and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            gate = self.gates.get(i)
            if gate is not None and not os.path.exists(gate[1]):
                open(gate[0], "w").close()
                deadline = time.monotonic() + GATE_LIMIT_S
                while not os.path.exists(gate[1]) and time.monotonic() < deadline:
                    time.sleep(0.01)
            return self.x[i], self.y[i]


    def chaos_digits(kills=(), gates=()):
        from gradhub.worker.data import digits

        train, val = digits()
        return ChaosDigits(*train.tensors, kills=kills, gates=gates), val
''')


# --- the schedule -------------------------------------------------------------------------------


class Shape(NamedTuple):
    """A job to draw: its mode and workers, how many of its workers die (least, most), and
    whether it is compared with an undisturbed run (a deterministic job: ps-sync, allreduce,
    the asynchronous modes with one worker)."""

    mode: str
    workers: int
    worker_kills: tuple[int, int] = (0, 2)
    compare: bool = False


@dataclass(frozen=True)
class Plan:
    """One job of a schedule: its shape, the workers killed (rank, step) and, for each gated
    server kill in order, the (rank, step) held at that kill's gate."""

    name: str
    mode: str
    workers: int
    spares: int
    steps: int
    kills: tuple[tuple[int, int], ...]
    gates: tuple[tuple[int, int], ...]
    compare: bool


@dataclass(frozen=True)
class Schedule:
    seed: int
    jobs: tuple[Plan, ...]
    free_kills: tuple[tuple[str, int], ...]  # after the gated kills: kill when (job name) passes (step)

    def __str__(self) -> str:
        lines = [f"chaos schedule (replay with {SEED_ENV}={self.seed}):"]
        for p in self.jobs:
            lines.append(f"  {p.name}: {p.mode}, {p.workers} workers, {p.spares} spares, {p.steps} steps; "
                         f"worker kills (rank, step) {list(p.kills)}; server kill gates {list(p.gates)}"
                         + ("; compared with an undisturbed run" if p.compare else ""))
        for name, step in self.free_kills:
            lines.append(f"  then a server kill when {name} passes step {step}")
        return "\n".join(lines)


def draw(seed: int, shapes: list[Shape], server_kills: int, horizon: int, free_kills: int = 0,
         spares: bool = False) -> Schedule:
    """A schedule for jobs of ``shapes``: ``server_kills`` gated server kills and each shape's
    worker kills, at steps before ``horizon`` (and the end of the first epoch), then
    ``free_kills`` unguarded server kills; with ``spares``, multi-worker jobs get a spare or not
    at random. A job ends a few steps after its last event."""
    rng = random.Random(seed)
    jobs = []
    for i, shape in enumerate(shapes):
        mode, workers, (least, most), compare = shape
        epoch = steps_per_epoch(TRAIN, workers * BATCH)  # events must be first reads
        events = rng.sample(range(CKPT_EVERY // 2, min(horizon, epoch - 1)), server_kills + most)
        gate_steps = sorted(events[:server_kills])
        kill_steps = sorted(events[server_kills:server_kills + rng.randint(least, most)])
        steps = max(gate_steps + kill_steps) + rng.randint(2, CKPT_EVERY)
        jobs.append(Plan(f"chaos-{i}-{mode}-{workers}w", mode, workers,
                         rng.randint(0, 1) if spares and workers > 1 else 0, steps,
                         tuple((rng.randrange(workers), s) for s in kill_steps),
                         tuple((rng.randrange(workers), s) for s in gate_steps), compare))
    free = []
    for _ in range(free_kills):
        plan = jobs[rng.randrange(len(jobs))]
        free.append((plan.name, rng.randint(max((s for _, s in plan.gates), default=0) + 1, plan.steps - 1)))
    return Schedule(seed, tuple(jobs), tuple(free))



def may_lose(plan: Plan) -> set[int]:
    """The checkpoints a job may lack: in allreduce, rank 0 sends each one in the background
    while training goes on, and one still on its way when rank 0 is killed is lost (the job
    takes the next on schedule). That is the latest before each kill of rank 0."""
    if plan.mode != "allreduce":
        return set()
    return {c for r, s in plan.kills if r == 0 and (c := s // CKPT_EVERY * CKPT_EVERY) > 0}


def spec(plan: Plan, code: Path, events: Path | None) -> dict:
    """The job's spec; ``events`` is None for the undisturbed reference (same data, no events)."""
    args: dict = {"kills": [], "gates": []}
    if events is not None:
        args["kills"] = [[first_read_at(plan.workers, r, s), str(events / f"{plan.name}.kill{k}")]
                         for k, (r, s) in enumerate(plan.kills)]
        args["gates"] = [[first_read_at(plan.workers, r, s), str(events / f"{plan.name}.arrived{k}"),
                          str(events / f"release{k}")] for k, (r, s) in enumerate(plan.gates)]
    return {"name": plan.name if events else f"undisturbed-{plan.name}", "mode": plan.mode,
            "workers": plan.workers, "spares": plan.spares, "resources": {"cpus": WORKER_CPUS},
            "model": {"factory": "gh_zoo:bn_net", "args": {"hidden": 32, "p": 0.2}},
            "dataset": {"factory": f"{PACKAGE}:chaos_digits", "args": args}, "working_dir": str(code),
            "optimizer": {"name": "adam", "lr": 0.002}, "batch_size": BATCH, "steps": plan.steps,
            "seed": SEED, "checkpoint_every": CKPT_EVERY, "keep_checkpoints": plan.steps // CKPT_EVERY + 1,
            "max_restarts": max(1, len(plan.kills))}


# --- running it ---------------------------------------------------------------------------------


def working_dir(root: Path) -> Path:
    """gh_zoo (for its model) and the chaos dataset, as one working_dir."""
    import shutil

    code = root / "code"
    shutil.copytree(Path(__file__).parents[1] / "integration" / "user_code" / "gh_zoo", code / "gh_zoo",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (code / PACKAGE).mkdir()
    (code / PACKAGE / "__init__.py").write_text(MODULE)
    return code


class Chaos:
    """Runs a schedule: the server in its own process, killed and restarted on the same data dir."""

    def __init__(self, schedule: Schedule, root: Path) -> None:
        self.schedule, self.root = schedule, root
        self.events = root / "events"
        self.events.mkdir(parents=True)
        self.code = working_dir(root)
        self.servers: list[ServerProcess] = []
        self.ids: dict[str, str] = {}  # plan name -> job id
        self.refs: dict[str, str] = {}  # plan name -> its undisturbed reference's job id
        self.before_kills: dict[str, dict[int, str]] = {}  # job id -> step -> sha256 listed before a kill
        self.hit: dict[str, list[int]] = {}  # job id -> [server kills it surely saw, kills it may have seen]
        self.t0 = time.monotonic()

    def note(self, what: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f} s] {what}", flush=True)

    @property
    def server(self) -> ServerProcess:
        return self.servers[-1]

    def start_server(self) -> None:
        port = self.servers[-1].port if self.servers else 0  # the same address, as a restarted service
        # every job and reference at once: the jobs wait at their gates until the references end,
        # so a reference that could only start after them would wait forever
        workers = sum((p.workers + p.spares) * (2 if p.compare else 1) for p in self.schedule.jobs)
        self.servers.append(ServerProcess(self.root / "data", self.root, f"server{len(self.servers)}",
                                          ray_cpus=max(2, math.ceil(workers * WORKER_CPUS))))
        self.server.start(port=port)
        self.note(f"{self.server.name} up at {self.server.address}")

    def kill_server(self, client: Client, gated: bool) -> None:
        """Kill the server (noting what each job had); at a gate every job is surely hit, else a
        job that is about to end may end first."""
        for job_id in [*self.ids.values(), *self.refs.values()]:
            for c in client.list_checkpoints(job_id):
                self.before_kills.setdefault(job_id, {})[c.step] = c.sha256
            if job_id in self.ids.values() and not client.get_job(job_id).done:
                self.hit.setdefault(job_id, [0, 0])[0 if gated else 1] += 1
        self.note(f"killing {self.server.name}")
        self.server.kill()
        assert_nothing_left(self.server)

    def _check_running(self, client: Client) -> None:
        for job_id in [*self.ids.values(), *self.refs.values()]:
            info = client.get_job(job_id)
            if info.state in ("FAILED", "CANCELLED"):
                pytest.fail(f"{info.name} ended {info.state} during the chaos: {info.reason}\n"
                            + "\n".join(client.logs(info.id)) + f"\n{self.schedule}")

    def run(self) -> dict[str, tuple[JobInfo, JobInfo | None]]:
        """Submit the jobs and their undisturbed references (which end before the first kill),
        kill as scheduled; returns name -> (job, reference or None)."""
        sched = self.schedule
        self.start_server()
        with Client(self.server.address) as client:
            for plan in sched.jobs:
                self.ids[plan.name] = client.submit(spec(plan, self.code, self.events)).id
            for plan in sched.jobs:
                if plan.compare:
                    self.refs[plan.name] = client.submit(spec(plan, self.code, None)).id
        for k in range(max(len(p.gates) for p in sched.jobs)):
            with Client(self.server.address) as client:
                arrived = [self.events / f"{p.name}.arrived{k}" for p in sched.jobs]

                def all_at_gate(arrived: list[Path] = arrived) -> bool:
                    self._check_running(client)
                    return (all(a.exists() for a in arrived)
                            and all(client.get_job(ref).done for ref in self.refs.values()))

                try:
                    wait_for(all_at_gate, JOB_TIMEOUT_S, f"every job at server kill gate {k}, every reference ended",
                             interval=0.05)
                except pytest.fail.Exception as e:  # say who is missing
                    behind = [f"{p.name} ({client.get_job(self.ids[p.name]).state}, step "
                              f"{client.get_job(self.ids[p.name]).step})" for p, a in zip(sched.jobs, arrived, strict=True)
                              if not a.exists()]
                    running = [name for name, ref in self.refs.items() if not client.get_job(ref).done]
                    pytest.fail(f"{e}: not at the gate {behind}, references still running {running}\n{sched}")
                self.kill_server(client, gated=True)
            (self.events / f"release{k}").touch()
            self.start_server()
        for name, step in sched.free_kills:
            with Client(self.server.address) as client:
                job_id = self.ids[name]

                def passed(job_id: str = job_id, step: int = step) -> bool:
                    self._check_running(client)
                    return client.get_job(job_id).step >= step

                wait_for(passed, JOB_TIMEOUT_S, f"{name} to pass step {step}", interval=0.01)
                self.kill_server(client, gated=False)
            self.start_server()
        with Client(self.server.address) as client:
            out = {}
            for plan in sched.jobs:
                info = client.job(self.ids[plan.name]).wait(timeout=JOB_TIMEOUT_S)
                out[plan.name] = (info, client.get_job(self.refs[plan.name]) if plan.compare else None)
            self.note("every job ended")
            self.check(client, out)
        return out

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.kill()
        if self.servers:
            assert_nothing_left(self.server)

    # --- the assertions -------------------------------------------------------------------------

    def check(self, client: Client, out: dict[str, tuple[JobInfo, JobInfo | None]]) -> None:
        for plan in self.schedule.jobs:
            info, ref = out[plan.name]
            logs = "\n".join(client.logs(info.id))
            why = f"{plan.name}: {info.reason}\n{logs}\n{self.schedule}"
            assert info.state == "SUCCEEDED" and info.step == plan.steps, why
            for k in range(len(plan.kills)):
                assert (self.events / f"{plan.name}.kill{k}").exists(), f"worker kill {k} never fired: {why}"
            for rank in range(plan.workers):
                died = sum(1 for r, _ in plan.kills if r == rank)
                assert logs.count(f"worker {rank} died (") == died, why
            surely, maybe = self.hit.get(info.id, [0, 0])
            assert surely <= logs.count("server restarted") <= surely + maybe, why
            checkpoints = self.checkpoints(client, info, plan)
            if ref is None:
                continue
            assert ref.state == "SUCCEEDED", f"undisturbed {plan.name}: {ref.reason}"
            expected = self.checkpoints(client, ref, plan)
            assert checkpoints.keys() <= expected.keys(), (plan.name, sorted(checkpoints), sorted(expected))
            for step, got in checkpoints.items():
                worst = max(float((got[k] - expected[step][k]).abs().max()) for k in expected[step])
                assert worst <= EXACT, (f"{plan.name}'s checkpoint at step {step} differs from the undisturbed "
                                        f"run's by {worst:.3g}\n{logs}\n{self.schedule}")

    def checkpoints(self, client: Client, info: JobInfo, plan: Plan) -> dict[int, dict[str, torch.Tensor]]:
        """Every checkpoint the server lists for a job, pulled (sha256 checked) and loaded; those
        listed before a server kill are all still there, unchanged."""
        listed: list[CheckpointMeta] = client.list_checkpoints(info.id)
        steps = {c.step: c.sha256 for c in listed}
        for step, sha in self.before_kills.get(info.id, {}).items():
            assert steps.get(step) == sha, f"{plan.name}'s checkpoint at step {step} was lost or changed"
        due = {*range(CKPT_EVERY, plan.steps, CKPT_EVERY), plan.steps}
        assert due - may_lose(plan) <= steps.keys() <= due, f"{plan.name} lists checkpoints at {sorted(steps)}"
        out = {}
        for c in listed:
            path = self.root / "pulled" / f"{info.id}-{c.step}.safetensors"
            client.pull_checkpoint(info.id, path, step=c.step)
            tensors = load_file(path)
            assert tensors and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()), \
                f"{plan.name}'s checkpoint at step {c.step} holds non-finite values"
            out[c.step] = tensors
        return out


def run_schedule(schedule: Schedule, root: Path) -> None:
    print(schedule)
    chaos = Chaos(schedule, root)
    try:
        chaos.run()
    finally:
        chaos.stop()


# the short version compares the sync modes (the contract) and kills their workers;
# test_exact_kill covers a killed worker of the asynchronous modes
EVERY_MODE = [Shape("ps-sync", 2, (1, 1), True), Shape("ps-async", 1, (0, 0)), Shape("ps-ssp", 1, (0, 0)),
              Shape("allreduce", 2, (1, 1), True)]


@pytest.mark.long  # the default suite kills a server in test_server_restart, workers in test_exact_kill
@pytest.mark.timeout(300)
def test_chaos_short(tmp_path: Path) -> None:
    """Every mode at once, one server kill mid-run in all of them; the sync jobs lose a worker
    each and end with their undisturbed runs' parameters."""
    seed = int(ENV_SEED) if ENV_SEED is not None else 0
    run_schedule(draw(seed, EVERY_MODE, server_kills=1, horizon=24), tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(600 * ROUNDS)
def test_chaos_soak(tmp_path: Path) -> None:
    """Two jobs per mode (more workers, spares), three gated server kills and an unguarded one,
    up to two worker kills per job; ``ROUNDS`` schedules."""
    first = int(ENV_SEED) if ENV_SEED is not None else random.SystemRandom().randrange(2**31)
    shapes = [Shape("ps-sync", 2, compare=True), Shape("ps-async", 1, compare=True), Shape("ps-ssp", 1, compare=True),
              Shape("allreduce", 2, compare=True), Shape("ps-sync", 3, compare=True), Shape("ps-async", 2),
              Shape("ps-ssp", 2), Shape("allreduce", 3, compare=True)]
    for round_ in range(ROUNDS):
        run_schedule(draw(first + round_, shapes, server_kills=3, horizon=80, free_kills=1, spares=True),
                     tmp_path / f"round{round_}")
