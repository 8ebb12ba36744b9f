"""`llamakit-tui --serve`: the same dashboard as a web page (textual-serve), to be opened only with the admin key.

Each browser tab gets its own `llamakit-tui` process, run by textual-serve and drawn in the page by xterm.js.
The admin key guards every route; a browser signs in once on a small form and then holds a session cookie:

- a form and a cookie, not the key in the URL (URLs stay in history, proxy logs and Referer headers) and not
  HTTP basic auth (the browser keeps and resends it with no way to sign out, and its prompt cannot say what
  was wrong);
- the cookie is a random token that names a session in this process, never the key itself: it is
  `HttpOnly` and `SameSite=Strict` (another site's page cannot make the browser send it), and the
  dashboard's WebSocket also refuses an `Origin` that is not the page's own;
- `Authorization: Bearer <admin key>` opens every route as well, for curl and for a proxy that adds it;
- wrong keys, on the form or as a Bearer, are limited per client address (`SignInLimit`): past the limit the
  address gets 429 with Retry-After, even for the right key, so that the lockout tells a guesser nothing.
"""

from __future__ import annotations

import hmac
import html
import logging
import math
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from textual_serve.server import Server
from yarl import URL

from llamakit.tui._sign_in_limit import MAX_FAILURES, WINDOW_SECONDS, SignInLimit, client_address

__all__ = ["COOKIE", "SESSION_SECONDS", "DashboardServer", "serve_dashboard"]

log = logging.getLogger("llamakit.tui.serve")

COOKIE = "llamakit_dashboard"
SESSION_SECONDS = 12 * 3600  # a signed-in browser signs in again after this long
HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:(?P<port>[0-9]{1,5}))?")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SIGN_IN_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>llamakit dashboard: sign in</title>
<style>
body {{ background: #0c181f; color: #e0e0e0; font: 16px monospace; display: flex; justify-content: center; }}
form {{ margin-top: 20vh; display: flex; flex-direction: column; gap: 12px; width: 32em; }}
input, button {{ font: inherit; padding: 8px; }}
.problem {{ color: #ff8a80; }}
</style></head>
<body><form method="post" action="/login">
<h1>llamakit dashboard</h1>
<p>{router}</p>
<p class="problem">{problem}</p>
<label for="key">Admin key</label>
<input id="key" name="key" type="password" autocomplete="current-password" autofocus required>
<button type="submit">Sign in</button>
</form></body></html>
"""


class DashboardServer(Server):
    """textual-serve's server for the dashboard of the router at `url`, every route behind `admin_key`, the wrong
    keys of each client address limited by `sign_in_limit` (default: 10 in any 5 minutes).

    The dashboard processes get the key from the environment (`LLAMAKIT_ADMIN_KEY`), never on their command
    line where `ps` would show it: `serve()` puts it there, and textual-serve hands its environment down.
    """

    def __init__(
        self,
        *,
        url: str,
        admin_key: str,
        interval: float = 1.0,
        host: str,
        port: int,
        sign_in_limit: SignInLimit | None = None,
    ) -> None:
        # `exec`: the dashboard replaces the shell textual-serve starts, so that its parent is this server.
        program = [sys.executable, "-m", "llamakit.tui", "--url", url, "--interval", f"{interval:g}"]
        command = f"exec {shlex.join(program)}"
        super().__init__(command, host=host, port=port, title=f"llamakit dashboard: {url}")
        self.router_url = url
        self._admin_key = admin_key
        self._sessions: dict[str, float] = {}  # session token → when it ends (time.monotonic())
        self.sign_in_limit = sign_in_limit if sign_in_limit is not None else SignInLimit()

    async def _make_app(self) -> web.Application:
        # textual-serve's own routes (the page, /ws, /static, /download), every one of them behind the sign-in:
        # the middleware refuses by default, so a route a later textual-serve adds is guarded too.
        app = await super()._make_app()
        app.middlewares.append(self._require_admin_key)
        app.router.add_post("/login", self.handle_login, name="login")
        return app

    async def on_startup(self, app: web.Application) -> None:
        where = f"{self.host}:{self.port}" if ":" not in self.host else f"[{self.host}]:{self.port}"
        log.info("serving the dashboard of %s on http://%s/ (sign in with the admin key)", self.router_url, where)

    def serve(self, debug: bool = False) -> None:
        """Serve until SIGINT or SIGTERM (open pages are closed and their dashboards quit)."""
        self.debug = debug
        os.environ["LLAMAKIT_ADMIN_KEY"] = self._admin_key  # for the dashboards textual-serve starts
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        web.run_app(self._make_app(), host=self.host, port=self.port, print=None, shutdown_timeout=5)

    async def handle_index(self, request: web.Request) -> web.StreamResponse:
        # textual-serve writes absolute URLs for the WebSocket and the static files from `public_url`; made
        # from the request instead, the page works whatever name or tunnel the browser reached it by.
        # (No await comes between this assignment and textual-serve's use of it.)
        self.public_url = str(origin(request))
        return await super().handle_index(request)

    async def handle_login(self, request: web.Request) -> web.Response:
        form = await request.post()
        key = form.get("key")
        if not isinstance(key, str) or not key:
            return self._sign_in_page("")
        wait = self._locked_out(request)
        if wait is not None:
            problem = f"Too many wrong keys from your address: try again in {wait} s."
            return self._sign_in_page(problem, status=429, headers={"Retry-After": str(wait)})
        if not self._key_opens(request, key):
            return self._sign_in_page("That is not the admin key of this router.")
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        self._sessions = {t: end for t, end in self._sessions.items() if end > now}
        self._sessions[token] = now + SESSION_SECONDS
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            COOKIE,
            token,
            max_age=SESSION_SECONDS,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=origin(request).scheme == "https",
        )
        raise response

    @web.middleware
    async def _require_admin_key(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.route.name == "login":
            return await handler(request)
        if not self._has_session(request):
            key = bearer_key(request)
            if key is not None and (wait := self._locked_out(request)) is not None:
                raise web.HTTPTooManyRequests(
                    text=f"too many wrong admin keys from this address: try again in {wait} s\n",
                    headers={"Retry-After": str(wait)},
                )
            if key is None or not self._key_opens(request, key):
                if request.method == "GET" and request.path == "/":
                    return self._sign_in_page("")
                raise web.HTTPUnauthorized(text="sign in with the router's admin key at /\n")
        if request.match_info.route.name == "websocket" and not same_origin(request):
            raise web.HTTPForbidden(text="the dashboard's WebSocket answers only its own page\n")
        return await handler(request)

    def _has_session(self, request: web.Request) -> bool:
        token = request.cookies.get(COOKIE)
        end = self._sessions.get(token) if token else None
        return end is not None and end > time.monotonic()

    def _locked_out(self, request: web.Request) -> int | None:
        """Whole seconds until the request's address may try a key again (the refusal logged at WARNING), or None
        when it may try one now."""
        address = client_address(request.remote)
        wait = self.sign_in_limit.retry_after(address)
        if wait <= 0:
            return None
        seconds = max(math.ceil(wait), 1)
        limit = self.sign_in_limit
        log.warning(
            "refused an admin key from %s: %d wrong keys came from it within %g s; it may try again in %d s",
            address, limit.max_failures, limit.window, seconds,
        )  # fmt: skip
        return seconds

    def _key_opens(self, request: web.Request, key: str) -> bool:
        """Whether `key` is the admin key; a wrong one counts against the request's address."""
        if self._is_admin_key(key):
            return True
        address = client_address(request.remote)
        wait = self.sign_in_limit.failed(address)
        if wait > 0:
            log.warning(
                "%s sent %d wrong admin keys within %g s: it may try no key for %d s",
                address, self.sign_in_limit.max_failures, self.sign_in_limit.window, max(math.ceil(wait), 1),
            )  # fmt: skip
        return False

    def _is_admin_key(self, key: str) -> bool:
        return hmac.compare_digest(key.encode(), self._admin_key.encode())

    def _sign_in_page(self, problem: str, *, status: int = 401, headers: dict[str, str] | None = None) -> web.Response:
        page = SIGN_IN_PAGE.format(router=html.escape(self.router_url), problem=html.escape(problem))
        return web.Response(status=status, text=page, content_type="text/html", headers=headers)


def bearer_key(request: web.Request) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, or None without one."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


def origin(request: web.Request) -> URL:
    """The scheme, host and port the browser used (`X-Forwarded-Proto` from a TLS proxy in front counts);
    400 for a `Host` that is not a host name or address with an optional port (it is written into the page)."""
    host = HOST.fullmatch(request.host)
    if host is None or int(host["port"] or 0) > 65535:
        raise web.HTTPBadRequest(text="the Host header must be a host name or address, with a port or none\n")
    scheme = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    return URL.build(scheme="https" if scheme == "https" else "http", authority=request.host)


def same_origin(request: web.Request) -> bool:
    """True unless the request says it comes from a page of another origin (browsers always send `Origin` on a
    WebSocket; curl and scripts send none)."""
    sent = request.headers.get("Origin")
    if sent is None:
        return True
    try:
        return URL(sent).authority.lower() == request.host.lower()
    except ValueError:
        return False


def serve_dashboard(
    *,
    url: str,
    admin_key: str,
    interval: float = 1.0,
    host: str,
    port: int,
    max_sign_in_failures: int = MAX_FAILURES,
    sign_in_window: float = WINDOW_SECONDS,
) -> None:
    """Serve the dashboard of the router at `url` as a web page on `host`:`port` until SIGINT or SIGTERM, taking
    at most `max_sign_in_failures` wrong admin keys from one client address in any `sign_in_window` seconds."""
    limit = SignInLimit(max_failures=max_sign_in_failures, window=sign_in_window)
    DashboardServer(url=url, admin_key=admin_key, interval=interval, host=host, port=port, sign_in_limit=limit).serve()
