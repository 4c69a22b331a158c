"""The web dashboard on the server's HTTP side: the job list, a page per job (curves, workers,
shards, checkpoints to download, the event log, a cancel button) and the same data as JSON.

Pages are rendered on the server (``gradhub.server.dashboard_html``) and a few lines of the
dashboard's own JavaScript refresh their live parts from ``/parts/...``; nothing is fetched
from elsewhere. Reads need only a login; cancelling and downloading a checkpoint follow the
gRPC rules (``Principal.check``: owners and admins). A cancel is a form POST, which must carry
the page's token and, when the browser names one, come from this server's own origin: with the
``SameSite=Strict`` cookie of ``/login`` that keeps other sites from posting it.

Another module (a sweep page, say) adds a page with a ``Dashboard`` of its own making: it
passes its ``NavLink`` in ``nav``, serves ``dashboard.routes()`` and its own routes, and
renders with ``dashboard.page(...)`` (the same header, style and headers); its forms use
``csrf_token`` and ``check_form``; ``http_errors``, ``may``, ``html_part`` and ``finite`` are
for its handlers too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import hmac
import importlib.resources
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from aiohttp import web

from gradhub.proto.contract.errors import NotFoundError, PermissionDeniedError, SpecError
from gradhub.proto.contract.states import JobState
from gradhub.server import dashboard_html as page
from gradhub.server.auth import Action, Principal
from gradhub.server.checkpoints import CheckpointInfo, CheckpointStore
from gradhub.server.dashboard_html import NavLink, ShardView
from gradhub.server.job_db import MetricPoint
from gradhub.server.jobs import JobManager, JobView
from gradhub.server.web import principal

__all__ = ["Dashboard", "NavLink", "ShardView", "dashboard_routes"]

LIST_LIMIT = 500  # the job list shows the newest jobs, this many at most
JOBS = NavLink("Jobs", "/")
LIVE = "X-Gradhub-Live"  # on a part: "false" once it will not change any more
SECURITY_HEADERS = {
    # the dashboard's own script and style only; no frames, no forms posted elsewhere
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}

S = TypeVar("S")  # the class of a page's handlers (``Dashboard``, or another module's)
Handler = Callable[[S, web.Request], Awaitable[web.StreamResponse]]


def dashboard_routes(manager: JobManager, checkpoints: CheckpointStore, nav: Sequence[NavLink] = (),
                     ) -> list[web.RouteDef]:
    """The dashboard's routes; ``nav``: more header links (other modules' pages)."""
    return Dashboard(manager, checkpoints, nav).routes()


def http_errors(handler: Handler[S]) -> Handler[S]:
    """Domain errors as HTTP statuses: an unknown job, sweep or checkpoint 404, a refusal 403."""

    @functools.wraps(handler)
    async def wrapped(self: S, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(self, request)
        except (NotFoundError, SpecError) as e:  # SpecError: not even a valid job id
            raise web.HTTPNotFound(text=f"{e}\n") from None
        except PermissionDeniedError as e:
            raise web.HTTPForbidden(text=f"{e}\n") from None
    return wrapped


class Dashboard:
    """The dashboard's handlers over a manager and a checkpoint store. Holds one secret, random
    per server start, that the cancel forms' tokens are made from."""

    def __init__(self, manager: JobManager, checkpoints: CheckpointStore, nav: Sequence[NavLink] = ()) -> None:
        self._jobs, self._ckpts = manager, checkpoints
        self.nav = (JOBS, *nav)
        self._secret = secrets.token_bytes(32)
        files = importlib.resources.files("gradhub.server") / "dashboard_static"
        self._static = {name: files.joinpath(name).read_bytes() for name in STATIC}

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.job_list),
            web.get("/parts/jobs", self.job_rows),
            web.get("/jobs/{job}", self.job_page),
            web.get("/jobs/{job}/live", self.job_live),
            web.post("/jobs/{job}/cancel", self.cancel),
            web.get(r"/jobs/{job}/checkpoints/{step:\d+}", self.download),
            web.get("/api/jobs", self.api_jobs),
            web.get("/api/jobs/{job}", self.api_job),
            web.get("/static/{name}", self.static),
        ]

    # ------------------------------------------------------------------------ pages
    @http_errors
    async def job_list(self, request: web.Request) -> web.StreamResponse:
        state = _state(request)
        views = await asyncio.to_thread(self._views, state)
        return self.page("Jobs", page.job_list(views, state, time.time()), JOBS.href)

    @http_errors
    async def job_rows(self, request: web.Request) -> web.StreamResponse:
        views = await asyncio.to_thread(self._views, _state(request))
        return html_part(page.job_rows(views, time.time()), live=True)

    @http_errors
    async def job_page(self, request: web.Request) -> web.StreamResponse:
        job_id, who = request.match_info["job"], principal(request)
        view, live = await asyncio.to_thread(self._live, job_id, who)
        csrf = self.csrf_token(who) if may(who, Action.CANCEL, view.record.owner) else None
        return self.page(f"{view.record.name} {job_id}", page.job_page(view, csrf, live))

    @http_errors
    async def job_live(self, request: web.Request) -> web.StreamResponse:
        view, live = await asyncio.to_thread(self._live, request.match_info["job"], principal(request))
        return html_part(live, live=not view.record.state.terminal)

    @http_errors
    async def cancel(self, request: web.Request) -> web.StreamResponse:
        job_id, who = request.match_info["job"], principal(request)
        form = await request.post()
        self.check_form(request, str(form.get("csrf", "")))
        owner = await asyncio.to_thread(self._jobs.owner, job_id)
        who.check(Action.CANCEL, owner)
        await asyncio.to_thread(self._jobs.cancel, job_id, f"cancelled by {who.name or 'the admin'} on the dashboard")
        raise web.HTTPSeeOther(page.job_href(job_id))

    @http_errors
    async def download(self, request: web.Request) -> web.StreamResponse:
        """A checkpoint's model file (safetensors), for its job's owner or an admin (like PullCheckpoint)."""
        job_id, step = request.match_info["job"], int(request.match_info["step"])
        owner = await asyncio.to_thread(self._jobs.owner, job_id)
        principal(request).check(Action.PULL, owner)
        info = await asyncio.to_thread(self._ckpts.get, job_id, step)
        chunks = await asyncio.to_thread(self._ckpts.iter_bytes, info)
        response = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{job_id}-step{info.step}.safetensors"',
            "X-Checkpoint-Sha256": info.sha256, **SECURITY_HEADERS})
        response.content_length = info.size_bytes
        try:
            await response.prepare(request)
            while (data := await asyncio.to_thread(next, chunks, None)) is not None:  # file reads off the loop
                await response.write(data)
            await response.write_eof()
        except ConnectionResetError:  # the browser went away: nothing more to send
            pass
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # the file, at once
        return response

    # ------------------------------------------------------------------------- JSON
    @http_errors
    async def api_jobs(self, request: web.Request) -> web.StreamResponse:
        views = await asyncio.to_thread(self._views, _state(request))
        return web.json_response({"jobs": [_job_json(v) for v in views]}, headers=SECURITY_HEADERS)

    @http_errors
    async def api_job(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job"]

        def read() -> tuple[JobView, list[MetricPoint], list[CheckpointInfo]]:
            return self._jobs.get(job_id), self._jobs.points(job_id), self._ckpts.list(job_id)

        view, points, infos = await asyncio.to_thread(read)
        return web.json_response({
            **_job_json(view),
            "points": [{"seq": p.seq, "step": p.step, "kind": p.kind, "metrics": finite(p.metrics), "at": p.at}
                       for p in points],
            "checkpoints": [{"step": c.step, "size_bytes": c.size_bytes, "sha256": c.sha256,
                             "created_at": c.created_at} for c in infos],
        }, headers=SECURITY_HEADERS)

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in self._static:
            raise web.HTTPNotFound()
        return web.Response(body=self._static[name], content_type=STATIC[name],
                            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    # --------------------------------------------------------------- for other pages
    def page(self, title: str, body: str, current: str = "") -> web.Response:
        """``body`` in the dashboard's layout, with its security headers."""
        return web.Response(text=page.layout(title, body, self.nav, current), content_type="text/html",
                            headers=SECURITY_HEADERS)

    def csrf_token(self, who: Principal) -> str:
        """The token a form of ``who`` carries (``check_form``)."""
        return hmac.new(self._secret, f"form:{who.name}".encode(), hashlib.sha256).hexdigest()

    def check_form(self, request: web.Request, token: str) -> None:
        """403 unless a form POST comes from this server's pages: a browser that names the
        request's origin names this one, and the form's ``token`` is the caller's. A call with
        an ``Authorization`` header is no browser's form (no site can make a browser send one)."""
        if request.headers.get("Authorization"):
            return
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            raise web.HTTPForbidden(text=f"origin: {origin[:100]!r} is not this server; post from its own pages\n")
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            raise web.HTTPForbidden(text="origin: a cross-site form; post from this server's own pages\n")
        if not hmac.compare_digest(token.encode(), self.csrf_token(principal(request)).encode()):
            raise web.HTTPForbidden(text="csrf: the form's token is missing or stale; reload the page and try again\n")

    # --------------------------------------------------------------------- reading
    def _views(self, state: JobState | None) -> list[JobView]:
        """The newest jobs (in ``state``), newest first; running ones with their workers."""
        records = self._jobs.db.list(states=None if state is None else (state,))[-LIST_LIMIT:]
        return [self._jobs.get(r.id) if r.state is JobState.RUNNING else JobView(r) for r in reversed(records)]

    def _live(self, job_id: str, who: Principal) -> tuple[JobView, str]:
        view = self._jobs.get(job_id)
        points, logs = self._jobs.points(job_id), self._jobs.logs(job_id)
        infos = self._ckpts.list(job_id)
        shards = [ShardView(s.index, s.host, s.updates_per_s, s.bytes_in, s.bytes_out) for s in view.shards]
        live = page.job_live(view, points, logs, infos, shards, may(who, Action.PULL, view.record.owner),
                             time.time())
        return view, live


def _state(request: web.Request) -> JobState | None:
    given = request.query.get("state", "")
    if not given:
        return None
    try:
        return JobState(given.upper())
    except ValueError:
        raise web.HTTPBadRequest(text=f"state: {given[:40]!r} is none of {', '.join(JobState)}\n") from None


def may(who: Principal, action: Action, owner: str) -> bool:
    try:
        who.check(action, owner)
    except PermissionDeniedError:
        return False
    return True


def html_part(text: str, live: bool) -> web.Response:
    return web.Response(text=text, content_type="text/html",
                        headers={**SECURITY_HEADERS, LIVE: "true" if live else "false"})


def finite(metrics: dict[str, float]) -> dict[str, float | None]:
    """``metrics`` for JSON, which has no NaN or infinity: those become null."""
    return {k: v if math.isfinite(v) else None for k, v in metrics.items()}


def _job_json(view: JobView) -> dict[str, Any]:
    record = dataclasses.asdict(view.record)
    record.pop("working_dir", None)  # a path on the server, of no use to a reader
    record["spec"] = json.loads(record.pop("spec_json"))
    record["state"] = str(view.record.state)
    record["metrics"] = finite(view.record.metrics)
    return {"job": record, "workers": [{**dataclasses.asdict(w), "state": str(w.state)} for w in view.workers],
            "shards": [dataclasses.asdict(s) for s in view.shards]}
