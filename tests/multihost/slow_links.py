"""Time to a target accuracy, and the bytes it took: what tests/multihost/test_slow_links.py and
tests/bench/bench_local_sgd.py measure a job by, plus ``throttle`` for the namespace topology.

``run_to_target`` submits a job, follows its curve (``Client.metrics``) and stops it (cancel) at
the first evaluation that reaches the target or when its time is up; the time to target is that
evaluation's arrival minus the job's ``started_at``, both on the server's clock. Bytes come from
where the system reports them: the server's /metrics counters (``gradhub_worker_pushed_bytes``,
``..._pulled_bytes``: the ps modes and local-sgd), and in the namespace topology the worker
hosts' interface counters (every byte on the link, whatever the mode).
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gradhub.client.client import Client, JobInfo, MetricPoint

from .netns import Network

RATE = "100mbit"
# tbf: `burst` is the bucket (32 kbit = 4 KiB) and `latency` how long a packet may queue
TBF = ("burst", "32kbit", "latency", "400ms")
POLL_S = 0.5


def throttle(net: Network, rate: str = RATE) -> None:
    """Shape every link of ``net`` to ``rate`` both ways: a tbf qdisc on each host's eth0 (what
    it sends) and on the bridge's end of its veth pair (what it receives)."""
    for i, host in enumerate(net.hosts):
        _tc(["tc", "qdisc", "replace", "dev", f"{net.tag}v{i}", "root", "tbf", "rate", rate, *TBF])
        _tc(["ip", "netns", "exec", host.netns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
             "rate", rate, *TBF])


def _tc(argv: list[str]) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")


def link_bytes(net: Network, role: str) -> int:
    """Bytes the host ``role`` has sent and received on its eth0 so far (tx + rx)."""
    host = next(h for h in net.hosts if h.role == role)
    total = 0
    for counter in ("tx_bytes", "rx_bytes"):
        out = subprocess.run(["ip", "netns", "exec", host.netns, "cat", f"/sys/class/net/eth0/statistics/{counter}"],
                             capture_output=True, text=True, timeout=15, check=True)
        total += int(out.stdout)
    return total


def scrape_worker_bytes(url: str, job_id: str, token: str | None = None) -> dict[int, dict[str, float]]:
    """Per rank of ``job_id``: ``pushed``, ``pulled`` (bytes) and ``step`` from the server's
    /metrics (only running jobs appear there); {} when the job is not listed."""
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        text = reply.read().decode()
    names = {"gradhub_worker_pushed_bytes": "pushed", "gradhub_worker_pulled_bytes": "pulled",
             "gradhub_worker_step": "step"}
    out: dict[int, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        key = names.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            if sample.labels.get("job") == job_id and not sample.name.endswith("_created"):
                out.setdefault(int(sample.labels["rank"]), {})[key] = sample.value
    return out


@dataclass
class Outcome:
    """One job run to a target: where and when it got there, and what it moved."""

    job_id: str
    mode: str
    reached: bool
    seconds: float | None  # started_at -> the first evaluation at or over the target
    step: int | None  # that evaluation's step (inner steps in local-sgd)
    best: float | None  # the best value of the metric seen
    wall_s: float  # started_at -> stopped
    info: JobInfo
    evals: list[tuple[float, int, float]] = field(default_factory=list)  # (s since start, step, value)
    worker_bytes: dict[int, dict[str, float]] = field(default_factory=dict)  # the last /metrics scrape
    link_bytes: dict[str, int] = field(default_factory=dict)  # host -> bytes, start of job to target
    hosts: dict[int, str] = field(default_factory=dict)  # rank -> "hostname (ip)", as seen while it ran
    training_s: float | None = None  # the first step seen done (polled) -> the target: start-up left out

    def as_row(self) -> dict[str, Any]:
        return {"job": self.job_id, "mode": self.mode, "reached": self.reached, "seconds": self.seconds,
                "step": self.step, "best": self.best, "wall_s": self.wall_s, "evals": self.evals,
                "worker_bytes": self.worker_bytes, "link_bytes": self.link_bytes, "hosts": self.hosts,
                "training_s": self.training_s,
                "job_metrics": dict(self.info.metrics)}


def run_to_target(client: Client, spec: Mapping[str, Any], target: float, *, limit_s: float,
                  metric: str = "val_accuracy", metrics_url: str | None = None, token: str | None = None,
                  counters: Callable[[], dict[str, int]] | None = None, start_timeout_s: float = 180.0,
                  training_limit_s: float | None = None) -> Outcome:
    """Submit ``spec`` and follow it until an evaluation has ``metric >= target``, the job ends,
    or ``limit_s`` seconds have passed since it started (``training_limit_s`` since its first
    step was seen done); a job still running then is cancelled.

    ``metrics_url``: scrape the server's /metrics while the job runs (the last scrape is kept);
    ``counters``: read when the job starts and when the target is reached (link byte counters).
    """
    job = client.submit(dict(spec))
    submitted = time.monotonic()
    points: list[MetricPoint] = []
    seq = 0
    hit: MetricPoint | None = None
    scraped: dict[int, dict[str, float]] = {}
    at_start: dict[str, int] | None = None
    at_hit: dict[str, int] | None = None
    hosts: dict[int, str] = {}
    first_step_at: float | None = None
    while True:
        info = client.get_job(job.id)
        if info.started_at is None and not info.done:
            if time.monotonic() - submitted > start_timeout_s:
                client.cancel(job.id)
                raise TimeoutError(f"job {job.id} did not start in {start_timeout_s:.0f} s: {info.state}")
            time.sleep(POLL_S)
            continue
        hosts.update({w.rank: w.host for w in info.workers if w.host})
        if first_step_at is None and any(w.step > 0 or w.local_step > 0 for w in info.workers):
            first_step_at = time.time()  # the server shares this machine's clock
        if at_start is None and counters is not None:
            at_start = counters()
        if metrics_url is not None and not info.done:
            scraped = scrape_worker_bytes(metrics_url, job.id, token) or scraped
        new = client.metrics(job.id, after=seq)
        points += new
        seq = max([seq, *(p.seq for p in new)])
        hit = next((p for p in points if p.kind == "eval" and p.metrics.get(metric, -1e300) >= target), None)
        started = info.started_at or time.time()
        trained = time.time() - first_step_at if first_step_at is not None else 0.0
        if hit is not None or info.done or time.time() - started > limit_s or (
                training_limit_s is not None and trained > training_limit_s):
            break
        time.sleep(POLL_S)
    if hit is not None and counters is not None:
        at_hit = counters()
    if not info.done:
        client.cancel(job.id)
        deadline = time.monotonic() + 120
        while not (info := client.get_job(job.id)).done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job.id} still {info.state} 120 s after its cancel")
            time.sleep(POLL_S)
    started = info.started_at or 0.0
    evals = [(p.at - started, p.step, p.metrics[metric]) for p in points if p.kind == "eval" and metric in p.metrics]
    links = {k: at_hit[k] - at_start[k] for k in at_hit} if at_hit is not None and at_start is not None else {}
    return Outcome(
        job_id=job.id, mode=str(spec.get("mode", "ps-sync")), reached=hit is not None,
        seconds=(hit.at - started) if hit is not None else None, step=hit.step if hit is not None else None,
        best=max((v for _, _, v in evals), default=None),
        wall_s=(info.finished_at or time.time()) - started, info=info, evals=evals, worker_bytes=scraped,
        link_bytes=links, hosts=hosts,
        training_s=hit.at - first_step_at if hit is not None and first_step_at is not None else None,
    )


def bytes_per_exchange(outcome: Outcome) -> float | None:
    """Measured bytes a worker sends and receives per exchange (a step; a round in local-sgd),
    from the last /metrics scrape: the mean over ranks of (pushed / exchanges) * 2 (the pull
    after each push is the same size in the same dtype; the counters' first pull is not one)."""
    rates = [w["pushed"] / w["step"] * 2 for w in outcome.worker_bytes.values() if w.get("step") and "pushed" in w]
    return sum(rates) / len(rates) if rates else None


# --------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class Task:
    """A job to train to ``target`` val_accuracy in every mode: the same model, data, optimizer
    (the inner one in local-sgd), per-worker batch and seed."""

    name: str
    model: dict[str, Any]
    dataset: dict[str, Any]
    optimizer: dict[str, Any]
    target: float
    steps: int  # a ceiling: jobs are stopped at the target
    eval_every: int
    batch_size: int = 32

    def params(self) -> int:
        from gradhub.worker.models import mlp

        return sum(p.numel() for p in mlp(**self.model["args"]).parameters())

    def spec(self, mode: str, workers: int, cpus: float, local_steps: int | None = None,
             fragments: int = 1, overlap: int = 0) -> dict[str, Any]:
        label = mode if local_steps is None else f"{mode}-h{local_steps}" + (f"-f{fragments}" if fragments > 1 else "")
        spec: dict[str, Any] = {
            "name": f"{self.name}-{label}-n{workers}", "mode": mode, "workers": workers,
            "resources": {"cpus": cpus}, "model": self.model, "dataset": self.dataset,
            "optimizer": self.optimizer, "batch_size": self.batch_size, "steps": self.steps, "seed": 0,
            "eval_every": self.eval_every,
        }
        if local_steps is not None:
            spec["local_steps"] = local_steps  # the outer optimizer: the default (SGD, Nesterov 0.9, lr 0.7)
        if fragments > 1:
            spec.update(fragments=fragments, fragment_overlap=overlap)
        return spec


DIGITS = Task("digits", {"name": "mlp", "args": {"hidden": [128]}}, {"name": "digits"},
              {"name": "adam", "lr": 0.005}, target=0.95, steps=1000, eval_every=5)


def synthetic_task(hidden: tuple[int, ...] = (2048, 1024), target: float = 0.8, steps: int = 1000,
                   eval_every: int = 10) -> Task:
    """``synthetic`` (a fixed random linear teacher over 32 features, 20,000 samples) learnt by
    an MLP far larger than it needs: [2048, 1024] is 2.18 M parameters (8.7 MB of float32), so
    that moving the model costs more than computing a step. Plain Adam reaches 0.8 in 50-100
    steps of batch 64 and levels off near 0.85."""
    return Task(f"synthetic-{'x'.join(map(str, hidden))}",
                {"name": "mlp", "args": {"in_features": 32, "hidden": list(hidden), "out_features": 10}},
                {"name": "synthetic", "args": {"n": 20000, "features": 32, "classes": 10, "seed": 0}},
                {"name": "adam", "lr": 0.001}, target=target, steps=steps, eval_every=eval_every)


@dataclass(frozen=True)
class Mode:
    """One way of training a task: a mode and, for local-sgd, its rounds and fragments."""

    label: str
    mode: str
    local_steps: int | None = None
    fragments: int = 1
    overlap: int = 0

    def spec(self, task: Task, workers: int, cpus: float) -> dict[str, Any]:
        return task.spec(self.mode, workers, cpus, self.local_steps, self.fragments, self.overlap)

    def exchanges(self, steps: int) -> int:
        """The exchanges (server steps) a job makes in ``steps`` (inner) steps."""
        return -(-steps // self.local_steps) * self.fragments if self.local_steps else steps


# the modes compared
MODES: tuple[Mode, ...] = (
    Mode("ps-sync", "ps-sync"), Mode("allreduce", "allreduce"),
    Mode("local-sgd H=10", "local-sgd", 10), Mode("local-sgd H=50", "local-sgd", 50),
    Mode("local-sgd H=50 F=4 τ=12", "local-sgd", 50, fragments=4, overlap=12),
)
