"""The dashboard's HTML: the page layout (header, nav, footer), the job list, the parts of a job's
page and its curves as SVG, all rendered on the server. Every value that a user or a job can
set (names, owners, reasons, log lines, metric names) goes through ``esc``; nothing here reads
the manager, so it is tested with plain records (``gradhub.server.dashboard`` gathers them).

Another module's page (a sweep page, say) uses ``layout`` with its own ``NavLink`` in ``nav``.
"""

from __future__ import annotations

import datetime
import html
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from gradhub.proto.contract.states import JobState
from gradhub.server.checkpoints import CheckpointInfo
from gradhub.server.job_db import MetricPoint
from gradhub.server.jobs import JobView

MAX_CHART_POINTS = 400  # a series longer than this is thinned (evenly, keeping its last point)
MARKERS_UP_TO = 60  # a series this short also gets a marker (with its value as a tooltip) per point
LOG_LINES = 500  # the event log shows a job's last lines


@dataclass(frozen=True)
class NavLink:
    """An entry of the header's navigation: ``label`` links to ``href`` (a path on this server)."""

    label: str
    href: str


@dataclass(frozen=True)
class ShardView:
    """One parameter-server shard of a job, as its page lists it."""

    shard: int
    host: str
    updates_per_s: float
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class Curve:
    """One chart of a job's page: ``series`` are (label, metric key, point kind) drawn against step."""

    title: str
    metric: str
    series: tuple[tuple[str, str, str], ...]


CURVES = (
    Curve("Loss", "loss", (("train", "loss", "train"), ("validation", "val_loss", "eval"))),
    Curve("Accuracy", "val_accuracy", (("validation", "val_accuracy", "eval"),)),
    Curve("Learning rate", "lr", (("lr", "lr", "train"),)),
    Curve("Samples/s", "samples_per_s", (("samples/s", "samples_per_s", "train"),)),
)


def esc(value: object) -> str:
    """``value`` as text safe inside an element or a quoted attribute."""
    return html.escape(str(value), quote=True)


def job_href(job_id: str, tail: str = "") -> str:
    return f"/jobs/{quote(job_id, safe='')}{tail}"


# ------------------------------------------------------------------------------------ layout

def layout(title: str, body: str, nav: Sequence[NavLink], current: str = "") -> str:
    """A whole page: ``body`` (already escaped HTML) under the header with ``nav``."""
    links = "".join(
        f'<a href="{esc(link.href)}"{" aria-current=page" if link.href == current else ""}>{esc(link.label)}</a>'
        for link in nav)
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · gradhub</title>"
        '<link rel=stylesheet href="/static/dashboard.css">'
        '<script src="/static/dashboard.js" defer></script></head>\n'
        f'<body><header><a class=brand href="/">gradhub</a><nav>{links}</nav></header>\n'
        f"<main>{body}</main></body></html>\n")


# ---------------------------------------------------------------------------------- job list

def job_list(views: Sequence[JobView], state: JobState | None, now: float) -> str:
    """The job list page's body: the state filter and the table (refreshed as ``job_rows``)."""
    choices = [("all", "/", state is None)] + [
        (str(s), f"/?state={s}", state is s) for s in JobState]
    tabs = "".join(f'<a href="{esc(href)}"{" aria-current=true" if on else ""}>{esc(label)}</a>'
                   for label, href, on in choices)
    refresh = "/parts/jobs" + (f"?state={state}" if state else "")
    return (
        f'<h1>Jobs</h1><p class=filter>State: {tabs}</p>'
        '<table class=jobs><thead><tr><th>Job</th><th>Name</th><th>State</th><th>Owner</th>'
        '<th>Mode</th><th>Progress</th><th class=num>Loss</th><th class=num>Accuracy</th>'
        '<th class=num>Samples/s</th><th class=num>Age</th></tr></thead>'
        f'<tbody id=jobs data-refresh="{esc(refresh)}" data-live=true>{job_rows(views, now)}</tbody></table>')


def job_rows(views: Sequence[JobView], now: float) -> str:
    if not views:
        return '<tr><td colspan=10 class=empty>No jobs.</td></tr>'
    rows = []
    for v in views:
        r = v.record
        rows.append(
            f'<tr data-job="{esc(r.id)}"><td><a href="{esc(job_href(r.id))}">{esc(r.id)}</a></td>'
            f"<td>{esc(r.name)}</td><td>{state_badge(r.state)}</td><td>{esc(r.owner or '—')}</td>"
            f"<td>{esc(r.mode)}</td><td>{progress(r.step, r.total_steps)}</td>"
            f"<td class=num>{metric(r.metrics, 'loss')}</td>"
            f"<td class=num>{metric(r.metrics, 'val_accuracy')}</td>"
            f"<td class=num>{number(r.samples_per_second) if r.samples_per_second else '—'}</td>"
            f'<td class=num title="{esc(timestamp(r.created_at))}">{age(now - r.created_at)}</td></tr>')
    return "".join(rows)


# ---------------------------------------------------------------------------------- job page

def job_page(view: JobView, csrf: str | None, live: str) -> str:
    """A job's page body: its title and cancel button (``csrf``: the form's token, None when
    the caller may not cancel), then ``live`` (``job_live``), which the page refreshes."""
    r = view.record
    cancel = ""
    if csrf is not None and not r.state.terminal:
        cancel = (f'<form method=post action="{esc(job_href(r.id, "/cancel"))}" class=cancel data-while-live>'
                  f'<input type=hidden name=csrf value="{esc(csrf)}">'
                  '<button type=submit id=cancel>Cancel job</button></form>')
    return (f'<div class=title><h1>{esc(r.name)} <code id=job-id>{esc(r.id)}</code></h1>{cancel}</div>'
            f'<div id=live data-refresh="{esc(job_href(r.id, "/live"))}" '
            f'data-live={"false" if r.state.terminal else "true"}>{live}</div>')


def job_live(view: JobView, points: Sequence[MetricPoint], logs: Sequence[tuple[int, str]],
             checkpoints: Sequence[CheckpointInfo], shards: Sequence[ShardView], may_pull: bool,
             now: float) -> str:
    """The part of a job's page that changes: summary, curves, workers, shards, checkpoints, log."""
    return "".join((summary(view, now), curves(points), workers(view), shard_table(shards),
                    checkpoint_table(view.record.id, checkpoints, may_pull), event_log(logs)))


def summary(view: JobView, now: float) -> str:
    r = view.record
    rows = [("State", f'<span id=state data-state="{esc(r.state)}">{state_badge(r.state)}</span>'),
            ("Owner", esc(r.owner or "—")), ("Mode", esc(r.mode)),
            ("Progress", progress(r.step, r.total_steps)),
            ("Loss", metric(r.metrics, "loss")), ("Accuracy", metric(r.metrics, "val_accuracy")),
            ("Samples/s", number(r.samples_per_second) if r.samples_per_second else "—"),
            ("Created", f'{esc(timestamp(r.created_at))} ({age(now - r.created_at)} ago)')]
    if r.started_at:
        rows.append(("Started", esc(timestamp(r.started_at))))
    if r.finished_at:
        rows.append(("Finished", esc(timestamp(r.finished_at))))
    if r.reason:
        rows.append(("Reason", f"<span class=reason>{esc(r.reason)}</span>"))
    cells = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return f"<dl class=summary>{cells}</dl>"


def workers(view: JobView) -> str:
    if not view.workers:
        return "<section><h2>Workers</h2><p class=empty>No workers run now.</p></section>"
    rows = "".join(
        f"<tr><td class=num>{w.rank}</td><td>{esc(w.host or '—')}</td><td class=num>{w.pid or '—'}</td>"
        f"<td>{esc(w.state)}</td><td class=num>{w.step}</td><td class=num>{w.staleness}</td>"
        f"<td class=num>{w.max_staleness}</td><td class=num>{w.restarts}</td><td>{esc(w.transport or '—')}</td></tr>"
        for w in view.workers)
    return ("<section><h2>Workers</h2><table id=workers><thead><tr><th class=num>Rank</th><th>Host</th>"
            "<th class=num>PID</th><th>Phase</th><th class=num>Step</th><th class=num>Staleness</th>"
            "<th class=num>Max staleness</th><th class=num>Restarts</th><th>Transport</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></section>")


def shard_table(shards: Sequence[ShardView]) -> str:
    """The job's parameter-server shards (0: the server's control store, which holds no
    value); nothing at all when it has none."""
    if not shards:
        return ""
    rows = "".join(
        f"<tr><td class=num>{s.shard if s.shard else '0 (control)'}</td><td>{esc(s.host)}</td><td class=num>{number(s.updates_per_s)}</td>"
        f"<td class=num>{size(s.bytes_in)}</td><td class=num>{size(s.bytes_out)}</td></tr>" for s in shards)
    return ("<section><h2>Parameter-server shards</h2><table id=shards><thead><tr><th class=num>Shard</th>"
            "<th>Host</th><th class=num>Updates/s</th><th class=num>In</th><th class=num>Out</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></section>")


def checkpoint_table(job_id: str, infos: Sequence[CheckpointInfo], may_pull: bool) -> str:
    if not infos:
        return "<section><h2>Checkpoints</h2><p class=empty>None yet.</p></section>"
    rows = []
    for c in reversed(infos):
        name = f"{job_id}-step{c.step}.safetensors"
        link = (f'<a download="{esc(name)}" href="{esc(job_href(job_id, f"/checkpoints/{c.step}"))}">download</a>'
                if may_pull else '<span class=muted title="only its owner or an admin may">—</span>')
        rows.append(f"<tr><td class=num>{c.step}</td><td class=num>{size(c.size_bytes)}</td>"
                    f"<td>{esc(timestamp(c.created_at))}</td><td><code>{esc(c.sha256[:12])}</code></td>"
                    f"<td>{link}</td></tr>")
    return ("<section><h2>Checkpoints</h2><table id=checkpoints><thead><tr><th class=num>Step</th>"
            "<th class=num>Size</th><th>Written</th><th>sha256</th><th></th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></section>")


def event_log(lines: Sequence[tuple[int, str]]) -> str:
    shown = lines[-LOG_LINES:]
    more = f"<p class=muted>The last {len(shown)} of {len(lines)} lines.</p>" if len(shown) < len(lines) else ""
    text = "\n".join(esc(line) for _, line in shown) or "(empty)"
    return f"<section><h2>Event log</h2>{more}<pre id=log>{text}</pre></section>"


# ---------------------------------------------------------------------------------- curves

def curves(points: Sequence[MetricPoint]) -> str:
    """Every chart of ``CURVES``, all over the same steps, so that they line up."""
    steps = (min((p.step for p in points), default=0), max((p.step for p in points), default=0))
    charts = "".join(f"<figure><figcaption>{esc(c.title)}</figcaption>{chart(c, points, steps)}</figure>"
                     for c in CURVES)
    return f"<section><h2>Curves</h2><div class=charts>{charts}</div></section>"


def series_of(points: Iterable[MetricPoint], key: str, kind: str) -> list[tuple[int, float]]:
    """(step, value) of every ``kind`` point that has a finite ``key``."""
    return [(p.step, float(p.metrics[key])) for p in points
            if p.kind == kind and key in p.metrics and math.isfinite(p.metrics[key])]


def thin(xy: list[tuple[int, float]], most: int = MAX_CHART_POINTS) -> list[tuple[int, float]]:
    """At most ``most`` of ``xy``, evenly spaced, always with the last."""
    if len(xy) <= most:
        return xy
    stride = math.ceil(len(xy) / most)
    kept = xy[::stride]
    return kept if kept[-1] == xy[-1] else [*kept[:most - 1], xy[-1]]


W, H, LEFT, RIGHT, TOP, BOTTOM = 360, 170, 58, 12, 10, 24
Scale = Callable[[float], float]


def chart(curve: Curve, points: Sequence[MetricPoint], steps: tuple[int, int] | None = None) -> str:
    """``curve`` as an SVG line chart against step (over ``steps``, first and last, when given):
    a polyline per series, with a marker per point when there are few."""
    data = [(label, thin(series_of(points, key, kind))) for label, key, kind in curve.series]
    data = [(label, xy) for label, xy in data if xy]
    head = (f'<svg class=chart data-metric="{esc(curve.metric)}" viewBox="0 0 {W} {H}" role=img '
            f'aria-label="{esc(curve.title)} against step">')
    if not data:
        return head + f'<text class=empty x="{W / 2}" y="{H / 2}" text-anchor=middle>no points yet</text></svg>'
    xs = [x for _, xy in data for x, _ in xy]
    ys = [y for _, xy in data for _, y in xy]
    x0, x1 = (min(xs), max(xs)) if steps is None else (min(steps[0], *xs), max(steps[1], *xs))
    out, px, py = frame(x0, x1, min(ys), max(ys))
    out.insert(0, head)
    for i, (label, xy) in enumerate(data):
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in xy)
        out.append(f'<polyline class="series s{i}" data-series="{esc(label)}" points="{coords}"/>')
        if len(xy) <= MARKERS_UP_TO:
            out.extend(f'<circle class="marker s{i}" cx="{px(x):.1f}" cy="{py(y):.1f}" r=2.5>'
                       f"<title>{esc(label)}, step {x}: {number(y)}</title></circle>" for x, y in xy)
    if len(data) > 1:
        out.extend(f'<text class="legend s{i}" x="{W - RIGHT - 4}" y="{TOP + 12 + 13 * i}" '
                   f"text-anchor=end>{esc(label)}</text>" for i, (label, _) in enumerate(data))
    return "".join(out) + "</svg>"


def frame(x0: float, x1: float, y0: float, y1: float) -> tuple[list[str], Scale, Scale]:
    """A chart's axes, grid and ticks over [x0, x1] x [y0, y1] (widened when empty), and the
    functions that place an x and a y in its ``W`` x ``H`` box (for other charts too)."""
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def py(y: float) -> float:
        return TOP + (y1 - y) / (y1 - y0) * (H - TOP - BOTTOM)

    out = [f'<line class=axis x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}"/>',
           f'<line class=axis x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}"/>']
    for y in (y0, (y0 + y1) / 2, y1):
        out.append(f'<line class=grid x1="{LEFT}" y1="{py(y):.1f}" x2="{W - RIGHT}" y2="{py(y):.1f}"/>'
                   f'<text class=tick x="{LEFT - 4}" y="{py(y) + 4:.1f}" text-anchor=end>{number(y)}</text>')
    for x in (x0, x1):
        out.append(f'<text class=tick x="{px(x):.1f}" y="{H - 6}" text-anchor=middle>{number(x)}</text>')
    return out, px, py


# ---------------------------------------------------------------------------------- values

def state_badge(state: JobState | str) -> str:
    return f'<span class="badge state-{esc(state)}">{esc(state)}</span>'


def progress(step: int, total: int) -> str:
    if total <= 0:
        return f"{step}"
    return (f'<progress value="{min(step, total)}" max="{total}"></progress> '
            f'<span class=muted>{step}/{total}</span>')


def metric(metrics: Mapping[str, float], key: str) -> str:
    value = metrics.get(key)
    return "—" if value is None else number(value)


def number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 1e6):
        return str(int(value))
    return esc(f"{value:.4g}")


def size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def age(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= span:
            return f"{s // span}{unit}"
    return f"{s}s"


def timestamp(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")
