"""The credentials of the router's two private parts, each checked in one place: the operator's part (mounted at
`/admin/`) answers only to the admin key, the herd's (`/herd/`) only to the herd token. Each part is a
sub-application whose one middleware checks its credential before any of its handlers runs; no handler checks one.

A tenant's API key opens neither part (it is checked on the paid path, `api.authenticate`). The admin key and the
herd token are separate secrets, compared in constant time (`llamakit.web.require_bearer`). A refusal is an
`ApiError` (401 `missing_credentials` or `invalid_credentials`), made into its body by the root app's
`error_middleware`, which wraps every sub-application's middlewares and handlers.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from llamakit.router.state import STATE
from llamakit.web import Handler, require_bearer

__all__ = ["admin_app", "admin_key_required", "herd_app", "herd_token_required"]


def admin_app(*tables: web.RouteTableDef) -> web.Application:
    """The operator's part, for `app.add_subapp("/admin/", …)`: every route in `tables` needs the admin key."""
    return _part(admin_key_required, tables)


def herd_app(*tables: web.RouteTableDef) -> web.Application:
    """The nodes' part, for `app.add_subapp("/herd/", …)`: every route in `tables` needs the herd token."""
    return _part(herd_token_required, tables)


@web.middleware
async def admin_key_required(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _routed(request):
        require_bearer(request, request.config_dict[STATE].settings.admin_key, what="admin key")
    return await handler(request)


@web.middleware
async def herd_token_required(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _routed(request):
        require_bearer(request, request.config_dict[STATE].settings.herd_token, what="herd token")
    return await handler(request)


def _part(guard: Middleware, tables: tuple[web.RouteTableDef, ...]) -> web.Application:
    part = web.Application(middlewares=[guard])
    for table in tables:
        part.add_routes(table)
    return part


def _routed(request: web.Request) -> bool:
    """Whether the request found one of the part's routes. A path the part has no route for, or a method it has
    none for, stays the 404 or 405 it was when these routes lived in the root app, whatever the credential: no
    handler of the part runs for it, only aiohttp's, which raises that error."""
    return request.match_info.http_exception is None
