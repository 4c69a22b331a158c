"""The server's HTTP side (``--http-port``): the dashboard, ``/metrics`` for Prometheus and
``/healthz``, served by aiohttp on the gRPC server's event loop (one concurrency model) and
guarded like the gRPC port: a user's bearer token (the ``Authorization`` header, or the cookie
that ``/login`` sets for a browser), or nothing on a server without tokens.

Pages and endpoints come from route tables that the modules owning them build
(``gradhub.server.dashboard``, ``gradhub.server.metrics``); this module only serves them.
"""

from __future__ import annotations

import html
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

from gradhub.proto.contract.errors import AuthError
from gradhub.server.auth import Principal, Users
from gradhub.server.config import is_loopback

log = logging.getLogger(__name__)

COOKIE = "gradhub_token"
PUBLIC = frozenset({"/healthz", "/login"})
PRINCIPAL = web.RequestKey("principal", Principal)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def principal(request: web.Request) -> Principal:
    """Who made ``request`` (the auth middleware put it there)."""
    return request[PRINCIPAL]


def build_app(users: Users, routes: Iterable[web.AbstractRouteDef] = ()) -> web.Application:
    """The application: ``routes`` behind the token check, plus /healthz and /login."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not users.required and not _loopback_host(request.host):
            # no token: a page on another site that points a name of its own at this machine
            # (DNS rebinding) must not read it; browsers always send the name they asked for
            raise web.HTTPForbidden(text=f"host: {request.host!r} is not this server's loopback name; a server "
                                         "without a token answers only to localhost and 127.0.0.1\n")
        if request.path in PUBLIC:
            return await handler(request)
        given = request.headers.get("Authorization", "")
        if not given and request.cookies.get(COOKIE):
            given = f"Bearer {request.cookies[COOKIE]}"
        try:
            request[PRINCIPAL] = users.authenticate(given)
        except AuthError:
            if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
                raise web.HTTPSeeOther(f"/login?next={request.path_qs}") from None
            raise web.HTTPUnauthorized(text="missing or wrong bearer token\n",
                                       headers={"WWW-Authenticate": "Bearer"}) from None
        return await handler(request)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def login_form(request: web.Request) -> web.Response:
        target = html.escape(_local(request.query.get("next", "/")), quote=True)
        return web.Response(content_type="text/html", text=LOGIN.format(next=target))

    async def login(request: web.Request) -> web.Response:
        form = await request.post()
        token = str(form.get("token", "")).strip()
        target = _local(str(form.get("next", "/")))
        try:
            users.authenticate(f"Bearer {token}")
        except AuthError:
            return web.Response(status=401, content_type="text/html",
                                text=LOGIN.format(next=html.escape(target, quote=True)).replace(
                                    "<!--error-->", "<p class=error>That token is not one this server knows.</p>"))
        response = web.HTTPSeeOther(target)
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=request.secure)
        raise response

    app = web.Application(middlewares=[authenticate], client_max_size=64 << 10)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_routes(list(routes))
    return app


def _loopback_host(host: str) -> bool:
    """Whether a Host header names this machine's loopback (with or without a port)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    return is_loopback(name.strip("[]"))


def _local(target: str) -> str:
    """``target`` when it is a path on this server, else ``/`` (no open redirect)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


class WebServer:
    """``await start()`` binds ``host``:``port`` (0: any free port) and returns the port;
    ``await stop()`` closes it. Runs on the event loop it is started on."""

    def __init__(self, app: web.Application, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self._app, self._host, self._port, self._tls = app, host, port, tls
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host.strip("[]"), self._port, ssl_context=self._tls,
                           reuse_address=True)
        await site.start()
        server: Any = site._server  # aiohttp keeps the bound socket here
        self.port = int(server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


LOGIN = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>gradhub: sign in</title>
<style>body{{font:15px system-ui,sans-serif;margin:4em auto;max-width:24em}}input{{width:100%;padding:.4em}}
.error{{color:#b00}}</style></head>
<body><h1>gradhub</h1><!--error-->
<form method=post action=/login><input type=hidden name=next value="{next}">
<p><label>Token<br><input type=password name=token autofocus></label></p>
<p><button type=submit>Sign in</button></p></form></body></html>
"""
