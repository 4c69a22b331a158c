"""The dashboard's sweep pages: the sweep list, a page per sweep (its spec, a chart of the
objective per trial, the leaderboard with a link to each trial's job, a cancel button) and the
same data as JSON, over a ``SweepRunner``; added to the job pages as ``gradhub.server.dashboard``
says (a ``NavLink``, its routes, its layout and forms).

Reads need only a login; a cancel follows CancelSweep's rule (the sweep's owner or an admin)
and is a form POST checked like a job's. The HTML is rendered here from plain views (whatever
a user sets, names and values of the space too, goes through ``esc``), so it is tested without
a server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from aiohttp import web

from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.contract.sweep import Choice, Param, TrialState
from gradhub.server.auth import Action
from gradhub.server.checkpoints import CheckpointStore
from gradhub.server.dashboard import (
    SECURITY_HEADERS,
    Dashboard,
    NavLink,
    finite,
    html_part,
    http_errors,
    may,
)
from gradhub.server.dashboard_html import (
    RIGHT,
    TOP,
    H,
    W,
    age,
    esc,
    frame,
    job_href,
    number,
    progress,
    state_badge,
)
from gradhub.server.dashboard_html import timestamp as when
from gradhub.server.jobs import JobManager
from gradhub.server.sweep_runner import SweepRunner, SweepView, TrialView
from gradhub.server.web import principal

__all__ = ["SWEEPS", "SweepPages", "dashboard_routes_with_sweeps"]

SWEEPS = NavLink("Sweeps", "/sweeps")
LIST_LIMIT = 200  # the sweep list shows the newest sweeps, this many at most
ENDED = (TrialState.COMPLETE, TrialState.PRUNED)  # trials with a value on the chart


def dashboard_routes_with_sweeps(manager: JobManager, checkpoints: CheckpointStore,
                                 sweeps: SweepRunner) -> list[web.RouteDef]:
    """The dashboard's routes (``gradhub.server.dashboard.dashboard_routes``) with its sweep pages."""
    dashboard = Dashboard(manager, checkpoints, nav=(SWEEPS,))
    return [*dashboard.routes(), *SweepPages(dashboard, sweeps).routes()]


class SweepPages:
    """The sweep pages' handlers, rendered in ``dashboard``'s layout."""

    def __init__(self, dashboard: Dashboard, sweeps: SweepRunner) -> None:
        self._dash, self._sweeps = dashboard, sweeps

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/sweeps", self.sweep_list),
            web.get("/parts/sweeps", self.sweep_rows),
            web.get("/sweeps/{sweep}", self.sweep_page),
            web.get("/sweeps/{sweep}/live", self.sweep_live),
            web.post("/sweeps/{sweep}/cancel", self.cancel),
            web.get("/api/sweeps", self.api_sweeps),
            web.get("/api/sweeps/{sweep}", self.api_sweep),
        ]

    @http_errors
    async def sweep_list(self, request: web.Request) -> web.StreamResponse:
        views = await asyncio.to_thread(self._views)
        return self._dash.page("Sweeps", sweep_list(views, time.time()), SWEEPS.href)

    @http_errors
    async def sweep_rows(self, request: web.Request) -> web.StreamResponse:
        views = await asyncio.to_thread(self._views)
        return html_part(sweep_rows(views, time.time()), live=True)

    @http_errors
    async def sweep_page(self, request: web.Request) -> web.StreamResponse:
        who = principal(request)
        view = await asyncio.to_thread(self._sweeps.get, request.match_info["sweep"])
        csrf = self._dash.csrf_token(who) if may(who, Action.CANCEL, view.record.owner) else None
        r = view.record
        return self._dash.page(f"{r.name or 'sweep'} {r.id}", sweep_page(view, csrf, time.time()), SWEEPS.href)

    @http_errors
    async def sweep_live(self, request: web.Request) -> web.StreamResponse:
        view = await asyncio.to_thread(self._sweeps.get, request.match_info["sweep"])
        return html_part(sweep_live(view, time.time()), live=not view.record.state.terminal)

    @http_errors
    async def cancel(self, request: web.Request) -> web.StreamResponse:
        sweep_id, who = request.match_info["sweep"], principal(request)
        form = await request.post()
        self._dash.check_form(request, str(form.get("csrf", "")))
        owner = await asyncio.to_thread(self._sweeps.owner, sweep_id)
        who.check(Action.CANCEL, owner)
        await asyncio.to_thread(self._sweeps.cancel, sweep_id,
                                f"cancelled by {who.name or 'the admin'} on the dashboard")
        raise web.HTTPSeeOther(sweep_href(sweep_id))

    @http_errors
    async def api_sweeps(self, request: web.Request) -> web.StreamResponse:
        views = await asyncio.to_thread(self._views)
        return web.json_response({"sweeps": [_sweep_json(v) for v in views]}, headers=SECURITY_HEADERS)

    @http_errors
    async def api_sweep(self, request: web.Request) -> web.StreamResponse:
        view = await asyncio.to_thread(self._sweeps.get, request.match_info["sweep"])
        return web.json_response({**_sweep_json(view), "spec": view.spec.to_dict(),
                                  "trials": [_trial_json(t) for t in view.trials]}, headers=SECURITY_HEADERS)

    def _views(self) -> list[SweepView]:
        """The newest sweeps, newest first, each with its trials."""
        return [self._sweeps.get(r.id) for r in reversed(self._sweeps.list_sweeps()[-LIST_LIMIT:])]


def _sweep_json(view: SweepView) -> dict[str, Any]:
    record = dataclasses.asdict(view.record)
    for private in ("working_dir", "spec_json"):  # a path on the server; the spec comes parsed
        record.pop(private, None)
    best = best_trial(view)
    return {"sweep": {**record, "state": str(view.record.state)}, "search": view.spec.search.name,
            "objective": view.spec.objective.to_dict(), "prune": view.spec.prune.name,
            "trials_done": trials_done(view), "trials_total": view.spec.trials,
            "best": None if best is None else {"number": best.record.number, "value": _value(best.record.value),
                                               "job_id": best.record.job_id}}


def _trial_json(view: TrialView) -> dict[str, Any]:
    t = view.record
    return {"number": t.number, "state": str(t.state), "job_id": t.job_id, "job_state": view.job_state,
            "params": t.params, "value": _value(t.value), "step": view.job_step,
            "total_steps": view.job_total_steps,
            "evaluations": finite({str(step): value for step, value in t.intermediate.items()}),
            "metrics": finite(t.metrics), "reason": t.reason, "created_at": t.created_at,
            "finished_at": t.finished_at}


def _value(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# ---------------------------------------------------------------------------------- HTML

def sweep_href(sweep_id: str, tail: str = "") -> str:
    return f"/sweeps/{quote(sweep_id, safe='')}{tail}"


def trials_done(view: SweepView) -> int:
    return sum(1 for t in view.trials if t.record.state.terminal)


def best_trial(view: SweepView) -> TrialView | None:
    return next((t for t in view.trials if t.record.number == view.best), None)


def choice_text(choice: Choice) -> str:
    """A search or a pruner as its sweep file names it: ``asha (min_resource=40)``."""
    options = ", ".join(f"{k}={v}" for k, v in choice.options.items())
    return esc(choice.name) + (f" <span class=muted>({esc(options)})</span>" if options else "")


def param_text(param: Param) -> str:
    """A dimension of the space: ``loguniform [0.0001, 0.05]``, ``choice [[64], [128]]``."""
    spec = param.to_dict()
    extra = " ".join(f"{k}={json.dumps(v)}" for k, v in spec.items() if k != param.kind)
    return f"{esc(param.kind)} <code>{esc(json.dumps(spec[param.kind]))}</code>" + (f" {esc(extra)}" if extra else "")


def param_value(value: Any) -> str:
    """A trial's value of a parameter, short: a float to 4 digits (its title has all of them)."""
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def base_job(job: JobSpec) -> str:
    length = f"{job.steps} steps" if job.steps is not None else f"{job.epochs} epochs"
    workers = f"{job.workers} worker{'s' * (job.workers != 1)}"
    return esc(f"{job.model.name} on {job.dataset.name}, {job.mode}, {workers}, {length}")


def sweep_list(views: Sequence[SweepView], now: float) -> str:
    """The sweep list page's body; its rows (``sweep_rows``) refresh themselves."""
    return ('<h1>Sweeps</h1><table class=sweeps><thead><tr><th>Sweep</th><th>Name</th><th>Owner</th>'
            '<th>State</th><th>Search</th><th>Objective</th><th>Trials</th><th class=num>Best</th>'
            '<th class=num>Age</th></tr></thead>'
            f'<tbody id=sweeps data-refresh="/parts/sweeps" data-live=true>{sweep_rows(views, now)}</tbody></table>')


def sweep_rows(views: Sequence[SweepView], now: float) -> str:
    if not views:
        return '<tr><td colspan=9 class=empty>No sweeps. Start one with <code>gradhub sweep SWEEP.yaml</code>.</td></tr>'
    rows = []
    for v in views:
        r, best = v.record, best_trial(v)
        rows.append(
            f'<tr data-sweep="{esc(r.id)}"><td><a href="{esc(sweep_href(r.id))}">{esc(r.id)}</a></td>'
            f"<td>{esc(r.name or '—')}</td><td>{esc(r.owner or '—')}</td><td>{state_badge(r.state)}</td>"
            f"<td>{esc(v.spec.search.name)}</td>"
            f"<td>{esc(v.spec.objective.metric)} <span class=muted>({esc(v.spec.objective.mode)})</span></td>"
            f"<td>{progress(trials_done(v), v.spec.trials)}</td>"
            f"<td class=num>{'—' if best is None or best.record.value is None else number(best.record.value)}</td>"
            f'<td class=num title="{esc(when(r.created_at))}">{age(now - r.created_at)}</td></tr>')
    return "".join(rows)


def sweep_page(view: SweepView, csrf: str | None, now: float) -> str:
    """A sweep's page body: its title and cancel button (``csrf``: the form's token, None when
    the caller may not cancel), its spec, then ``sweep_live``, which the page refreshes."""
    r, spec = view.record, view.spec
    cancel = ""
    if csrf is not None and not r.state.terminal:
        cancel = (f'<form method=post action="{esc(sweep_href(r.id, "/cancel"))}" class=cancel data-while-live>'
                  f'<input type=hidden name=csrf value="{esc(csrf)}">'
                  '<button type=submit id=cancel>Cancel sweep</button></form>')
    space = "".join(f"<tr><td><code>{esc(path)}</code></td><td>{param_text(p)}</td></tr>"
                    for path, p in spec.space.items())
    rows = [("Search", choice_text(spec.search)),
            ("Objective", f"{esc(spec.objective.metric)} ({esc(spec.objective.mode)})"),
            ("Pruner", choice_text(spec.prune)), ("Trials", f"{spec.trials}, {spec.parallel} at once"),
            ("Base job", base_job(spec.job)),
            ("Seed", esc(r.seed))]
    cells = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return (f'<div class=title><h1>{esc(r.name or "sweep")} <code id=sweep-id>{esc(r.id)}</code></h1>{cancel}</div>'
            f'<section><h2>Spec</h2><dl class=summary id=spec>{cells}</dl>'
            f'<table id=space><thead><tr><th>Parameter</th><th>Distribution</th></tr></thead>'
            f'<tbody>{space}</tbody></table></section>'
            f'<div id=live data-refresh="{esc(sweep_href(r.id, "/live"))}" '
            f'data-live={"false" if r.state.terminal else "true"}>{sweep_live(view, now)}</div>')


def sweep_live(view: SweepView, now: float) -> str:
    """The part of a sweep's page that changes: its state, the chart and the leaderboard."""
    r, best = view.record, best_trial(view)
    rows = [("State", f'<span id=state data-state="{esc(r.state)}">{state_badge(r.state)}</span>'),
            ("Owner", esc(r.owner or "—")), ("Trials", progress(trials_done(view), view.spec.trials)),
            ("Best", "—" if best is None or best.record.value is None
             else f"{number(best.record.value)} <span class=muted>(trial {best.record.number})</span>"),
            ("Created", f"{esc(when(r.created_at))} ({age(now - r.created_at)} ago)")]
    if r.finished_at:
        rows.append(("Finished", esc(when(r.finished_at))))
    if r.reason:
        rows.append(("Reason", f"<span class=reason>{esc(r.reason)}</span>"))
    cells = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    caption = f"{esc(view.spec.objective.metric)} per trial"
    return (f"<dl class=summary>{cells}</dl>"
            f"<section><h2>Objective</h2><div class=charts><figure><figcaption>{caption}</figcaption>"
            f"{objective_chart(view)}</figure></div></section>{leaderboard(view)}")


def leaderboard(view: SweepView) -> str:
    """The trials, best first (the runner's order): a pruned one is marked, each links to its job."""
    if not view.trials:
        return "<section><h2>Leaderboard</h2><p class=empty>No trials yet.</p></section>"
    rows = []
    for rank, v in enumerate(view.trials, 1):
        t = v.record
        marks = [str(t.state).lower()] + (["best"] if t.number == view.best else [])
        params = " ".join(f'<code title="{esc(json.dumps(p))}">{esc(k)}={esc(param_value(p))}</code>'
                          for k, p in t.params.items())
        job = (f'<a class=job href="{esc(job_href(t.job_id))}">{esc(t.job_id)}</a>'
               f' <span class=muted>{esc(v.job_state)}</span>' if t.job_id else '<span class=muted>—</span>')
        rows.append(
            f'<tr data-trial="{t.number}" data-state="{esc(t.state)}" class="{" ".join(marks)}">'
            f"<td class=num>{rank}</td><td class=num>{t.number}</td><td>{state_badge(t.state)}</td>"
            f"<td class=params>{params}</td>"
            f"<td class=num>{'—' if t.value is None else number(t.value)}</td>"
            f"<td>{progress(v.job_step, v.job_total_steps)}</td><td>{job}</td>"
            f"<td class=reason>{esc(t.reason)}</td></tr>")
    return ("<section><h2>Leaderboard</h2><table id=leaderboard><thead><tr><th class=num>Rank</th>"
            "<th class=num>Trial</th><th>State</th><th>Parameters</th>"
            f"<th class=num>{esc(view.spec.objective.metric)}</th><th>Step</th><th>Job</th><th>Reason</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def objective_chart(view: SweepView) -> str:
    """The objective of each completed or pruned trial against its number (a marker each: a
    pruned one hollow, at its last evaluation) and the best completed value so far as a line."""
    mode = view.spec.objective.mode
    ended = sorted((t.record.number, float(t.record.value), t.record.state) for t in view.trials
                   if t.record.state in ENDED and t.record.value is not None and math.isfinite(t.record.value))
    head = (f'<svg class=chart data-chart=objective viewBox="0 0 {W} {H}" role=img '
            f'aria-label="{esc(view.spec.objective.metric)} against trial">')
    if not ended:
        return head + f'<text class=empty x="{W / 2}" y="{H / 2}" text-anchor=middle>no trial ended yet</text></svg>'
    ys = [y for _, y, _ in ended]
    out, px, py = frame(0, max(view.spec.trials - 1, ended[-1][0]), min(ys), max(ys))
    out.insert(0, head)
    best: float | None = None
    line: list[str] = []
    for n, y, state in ended:
        if state is not TrialState.COMPLETE:
            continue
        if best is not None:
            line.append(f"{px(n):.1f},{py(best):.1f}")
        best = y if best is None or (y > best if mode == "max" else y < best) else best
        line.append(f"{px(n):.1f},{py(best):.1f}")
    if line:
        out.append(f'<polyline class="series s0 best" data-series="best so far" points="{" ".join(line)}"/>')
    for n, y, state in ended:
        out.append(f'<circle class="trial {esc(str(state).lower())}" data-trial="{n}" cx="{px(n):.1f}" '
                   f'cy="{py(y):.1f}" r=3.5><title>trial {n} ({esc(str(state).lower())}): {number(y)}</title></circle>')
    legend = [("s0", "best so far")] + [("pruned", "○ pruned")] * any(s is TrialState.PRUNED for *_, s in ended)
    out.extend(f'<text class="legend {cls}" x="{W - RIGHT - 4}" y="{TOP + 12 + 13 * i}" text-anchor=end>{label}</text>'
               for i, (cls, label) in enumerate(legend))
    return "".join(out) + "</svg>"
