"""Rich renderings of jobs: the live progress bar behind ``Job.wait(progress=True)``, and the
jobs table and job details that ``gradhub status`` prints."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence

from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from gradhub.client.client import CheckpointMeta, Client, JobInfo, MetricPoint
from gradhub.proto.contract.errors import GradhubError
from gradhub.proto.contract.states import JobState

ACCURACY_KEY = "val_accuracy"
STATE_STYLES: dict[str, str] = {  # by JobState (a StrEnum: its values are the keys)
    JobState.QUEUED: "dim",
    JobState.RUNNING: "cyan",
    JobState.SUCCEEDED: "green",
    JobState.FAILED: "bold red",
    JobState.CANCELLED: "yellow",
}


# --- the progress bar -------------------------------------------------------------------------


def watch_with_progress(
    client: Client, job_id: str, timeout: float | None = None, console: Console | None = None
) -> JobInfo:
    """Follow ``client.watch(job_id)`` with a progress bar until the job ends; its last state.

    The bar shows step/total_steps, the training loss, the validation accuracy and samples/s.
    While the workers have not reported ``total_steps`` yet (0) the bar pulses. It draws on
    ``console`` (default: stderr, so stdout stays for results).
    """
    console = console or Console(stderr=True)
    last: JobInfo | None = None
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[steps]}"),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, refresh_per_second=4) as progress:
        task = progress.add_task(job_id, total=None, steps="", stats="")
        for info in client.watch(job_id, timeout=timeout):
            last = info
            progress.update(
                task,
                description=f"[{state_style(info.state)}]{info.id} {info.state.lower()}",
                total=info.total_steps or None,
                completed=info.step,
                steps=steps_text(info),
                stats=" ".join(_stats(info)),
            )
    if last is None:  # the server answers a watch with the job at once; this is a broken stream
        raise GradhubError(f"watch: the server sent nothing about job {job_id!r}")
    return last


def _stats(info: JobInfo) -> list[str]:
    out = []
    if "loss" in info.metrics:
        out.append(f"loss {info.metrics['loss']:.4f}")
    if ACCURACY_KEY in info.metrics:
        out.append(f"acc {info.metrics[ACCURACY_KEY]:.1%}")
    if info.samples_per_second > 0 and not info.done:
        out.append(f"{info.samples_per_second:,.0f} samples/s")
    return out


# --- small formatters -------------------------------------------------------------------------


def state_style(state: str) -> str:
    return STATE_STYLES.get(state, "")


def steps_text(info: JobInfo) -> str:
    """``12/440``, or ``12/?`` while the total is not known yet."""
    return f"{info.step}/{info.total_steps or '?'}"


def workers_alive(info: JobInfo) -> str:
    """``running/total``; a job that is not running has no live workers (``0/2``)."""
    running = sum(1 for w in info.workers if w.state == "running")
    total = info.size or len(info.workers) or info.world_size
    return f"{running}/{total}"


def ago(timestamp: float | None, now: float | None = None) -> str:
    """``12s ago``, ``3m ago``, ``5h ago``, ``2d ago``; ``-`` for no time."""
    if not timestamp:
        return "-"
    seconds = max(0.0, (time.time() if now is None else now) - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def duration(seconds: float) -> str:
    """``8.1s``, ``3m 05s``, ``2h 04m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def number(value: float) -> str:
    """A metric for people: ``0.1234``, ``5,044``."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"


def _metric(info: JobInfo, key: str, fmt: str) -> str:
    return format(info.metrics[key], fmt) if key in info.metrics else "-"


def _state(info: JobInfo) -> Text:
    return Text(info.state, style=state_style(info.state))


# --- status: the table of jobs ----------------------------------------------------------------


def jobs_table(jobs: Iterable[JobInfo], now: float | None = None) -> Table:
    """One row per job: id, name, (owner,) mode, state, step, loss, accuracy, samples/s, workers,
    age; the owner column only when some job has one (a server with users)."""
    jobs = list(jobs)
    owners = any(j.owner for j in jobs)
    table = Table(box=None, header_style="bold", pad_edge=False)
    # on a narrow terminal the id and the state keep their width; the name folds
    table.add_column("ID", no_wrap=True, min_width=max((len(j.id) for j in jobs), default=2))
    table.add_column("NAME", overflow="fold")
    if owners:
        table.add_column("OWNER", no_wrap=True)
    table.add_column("MODE", no_wrap=True)
    table.add_column("STATE", no_wrap=True, min_width=len("SUCCEEDED"))
    for name in ("STEP", "LOSS", "ACC", "SAMPLES/S", "WORKERS"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("AGE", justify="right", no_wrap=True)
    for info in jobs:
        rate = f"{info.samples_per_second:,.0f}" if info.samples_per_second > 0 else "-"
        table.add_row(
            info.id, Text(info.name), *([info.owner or "-"] if owners else []), info.mode, _state(info), steps_text(info),
            _metric(info, "loss", ".4f"), _metric(info, ACCURACY_KEY, ".1%"), rate,
            workers_alive(info), ago(info.created_at, now),
        )
    return table


# --- status JOB: one job in detail ------------------------------------------------------------


def spec_summary(spec: dict) -> str:
    """``ps-sync, 2 workers (cpus 0.5), mlp {hidden: [128]} on digits, adam lr 0.005, ...``."""
    if not spec:
        return "-"
    parts = [str(spec.get("mode", "?"))]
    size = spec.get("workers", "?")
    if isinstance(size, dict):  # an elastic job
        size = f"{size.get('min', 1)} to {size.get('max', '?')}"
    workers = f"{size} workers"
    resources = spec.get("resources") or {}
    if resources:
        workers += " (" + ", ".join(f"{k} {v}" for k, v in resources.items() if v) + ")"
    parts.append(workers)
    parts.append(f"{_component(spec.get('model'))} on {_component(spec.get('dataset'))}")
    opt = spec.get("optimizer") or {}
    if opt:
        parts.append(f"{opt.get('name', '?')} lr {opt.get('lr', '?')}")
    parts.append(f"batch {spec.get('batch_size', '?')}")
    if spec.get("steps"):
        parts.append(f"{spec['steps']} steps")
    elif spec.get("epochs"):
        parts.append(f"{spec['epochs']} epochs")
    if spec.get("staleness") is not None:
        parts.append(f"staleness {spec['staleness']}")
    if spec.get("compression", "none") != "none":
        parts.append(f"compression {spec['compression']}")
    return ", ".join(parts)


def _component(c: object) -> str:
    if not isinstance(c, dict):
        return str(c) if c else "?"
    name = c.get("name") or c.get("factory") or "?"
    args = c.get("args")
    if args:
        name += " {" + ", ".join(f"{k}: {v}" for k, v in args.items()) + "}"
    return str(name)


SPARK = "▁▂▃▄▅▆▇█"
CURVES = (("train", "loss", "loss"), ("eval", ACCURACY_KEY, "accuracy"), ("train", "samples_per_s", "samples/s"))


def sparkline(values: Sequence[float], width: int) -> str:
    """``values`` as a line of ``width`` block characters at most (each the mean of its share
    of the values), from the lowest (▁) to the highest (█)."""
    if not values or width < 1:
        return ""
    if len(values) > width:  # each character: the mean of its slice
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in itertools.pairwise(edges) if b > a]
    lo, hi = min(values), max(values)
    span = hi - lo
    return "".join(SPARK[0 if span <= 0 else min(int((v - lo) / span * len(SPARK)), len(SPARK) - 1)]
                   for v in values)


def curves(points: Sequence[MetricPoint], width: int = 60) -> Table | None:
    """Loss, accuracy and samples/s of a job's points as sparklines, with their first, last and
    best values; None when there are no points yet."""
    table = Table(title="curves", title_justify="left", box=None, header_style="bold")
    for name, justify in (("NAME", "left"), ("CURVE", "left"), ("FIRST", "right"), ("LAST", "right"),
                          ("BEST", "right"), ("POINTS", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for kind, key, label in CURVES:
        values = [p.metrics[key] for p in points if p.kind == kind and key in p.metrics]
        if not values:
            continue
        best = min(values) if key == "loss" else max(values)
        table.add_row(label, sparkline(values, width), number(values[0]), number(values[-1]), number(best),
                      str(len(values)))
    return table if table.row_count else None


def job_details(
    info: JobInfo, checkpoints: Sequence[CheckpointMeta] = (), now: float | None = None,
    points: Sequence[MetricPoint] = (), width: int = 60,
) -> RenderableType:
    """The job's spec, state and reason, progress, workers, curves (from ``points``, drawn
    ``width`` characters wide at most), latest metrics and checkpoints."""
    now = time.time() if now is None else now
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    state = _state(info)
    if info.reason:
        state.append(f"  {info.reason}", style="")
    head.add_row("job", Text(f"{info.id}  {info.name}" + (f"  (owner {info.owner})" if info.owner else "")))
    head.add_row("state", state)
    head.add_row("spec", Text(spec_summary(info.spec)))
    if info.target_size:
        now_ = f"{info.size} workers now" if info.size else "not running"
        head.add_row("size", f"{now_}, scaled to {info.target_size} ({info.min_workers} to {info.world_size})")
    rate = f", {info.samples_per_second:,.0f} samples/s" if info.samples_per_second > 0 else ""
    if info.mode == "local-sgd":
        per_round = info.metrics.get("bytes_per_round")
        traffic = f", {per_round / 1e6:,.2f} MB a worker a round" if per_round else ""
        fragments = int(info.spec.get("fragments") or 1)
        shape = f"{info.spec.get('local_steps', '?')} local steps" + \
            (f", in {fragments} fragments (a step each)" if fragments > 1 else "")
        head.add_row("round", f"{steps_text(info)} of {shape}{traffic}{rate}")
    else:
        head.add_row("step", f"{steps_text(info)} (version {info.version}){rate}")
    times = f"created {ago(info.created_at, now)}"
    if info.started_at:
        end = info.finished_at or now
        times += f", {'ran' if info.finished_at else 'running for'} {duration(end - info.started_at)}"
    head.add_row("time", times)
    if info.tensorboard_dir:
        head.add_row("tensorboard", Text(f"tensorboard --logdir {info.tensorboard_dir}"))
    parts: list[RenderableType] = [head]

    if info.workers:
        workers = Table(title="workers", title_justify="left", box=None, header_style="bold")
        local = info.mode == "local-sgd"  # its step is a round; the worker's inner steps beside it
        names = ("RANK", "STATE", "ROUND" if local else "STEP", *(("LOCAL STEP",) if local else ()), "STALENESS",
                 "MAX", "HOST", "PID", "RESTARTS", "TRANSPORT")
        for name in names:
            workers.add_column(name, justify="left" if name in ("STATE", "HOST") else "right")
        for w in sorted(info.workers, key=lambda w: w.rank):
            workers.add_row(str(w.rank), w.state, str(w.step), *((str(w.local_step),) if local else ()),
                            str(w.staleness), str(w.max_staleness), w.host or "-", str(w.pid or "-"),
                            str(w.restarts), w.transport or "-")
        parts += [Text(), workers]

    if info.shards:
        shards = Table(title="parameter-server shards", title_justify="left", box=None, header_style="bold")
        for name in ("SHARD", "HOST", "PID", "PARAMETERS", "VERSION", "IN", "OUT", "UPDATES/S"):
            shards.add_column(name, justify="left" if name == "HOST" else "right")
        for s in info.shards:
            shards.add_row(str(s.index), s.host or "-", str(s.pid or "-"), f"{s.first:,}..{s.end - 1:,}" if s.end else "control", str(s.version),
                           _size(s.bytes_in), _size(s.bytes_out), f"{s.updates_per_s:,.1f}")
        parts += [Text(), shards]

    drawn = curves(points, width) if width >= 8 else None
    if drawn is not None:
        parts += [Text(), drawn]

    if info.metrics:
        metrics = Table(title="metrics", title_justify="left", box=None, header_style="bold")
        metrics.add_column("NAME")
        metrics.add_column("VALUE", justify="right")
        for key, value in sorted(info.metrics.items()):
            metrics.add_row(key, number(value))
        parts += [Text(), metrics]

    ckpts = Table(title="checkpoints", title_justify="left", box=None, header_style="bold")
    for name in ("STEP", "VERSION", "SIZE", "SHA256", "CREATED"):
        ckpts.add_column(name, justify="left" if name == "SHA256" else "right", no_wrap=True)
    for c in sorted(checkpoints, key=lambda c: c.step):
        ckpts.add_row(str(c.step), str(c.version), _size(c.size_bytes), c.sha256[:16],
                      ago(c.created_at, now))
    parts += [Text(), ckpts if checkpoints else Text("no checkpoints", style="dim")]
    return Group(*parts)


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    size = float(n)
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            break
    return f"{size:.1f} {unit}"
