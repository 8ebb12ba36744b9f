"""The credentials of the router's two private parts, each checked in one place: the operator's part (mounted at
`/admin/`) answers only to the admin key, the herd's (`/herd/`) only to the herd token. Each part is a
sub-application whose one middleware checks its credential before any of its handlers runs; no handler checks one.

A tenant's API key opens neither part; the tenant's routes (`/v1/…`) call `authenticate` for their caller: its
account and its key's limits, which the paid path needs (`/v1/info` is public). The admin key and the
herd token are separate secrets, compared in constant time (`llamakit.web.require_bearer`). A refusal is an
`ApiError` (401 `missing_credentials` or `invalid_credentials`), made into its body by the root app's
`error_middleware`, which wraps every sub-application's middlewares and handlers.
"""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.typedefs import Middleware

from llamakit.router.ledger import hash_key
from llamakit.router.limits import Caller
from llamakit.router.state import STATE
from llamakit.web import Handler, bearer_token, require_bearer
from llamakit.wire.errors import ApiError

__all__ = ["admin_app", "admin_key_required", "authenticate", "herd_app", "herd_token_required"]


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


async def authenticate(request: web.Request) -> Caller:
    """The caller of a request: its API key's account and limits. 401 for a missing, unknown, revoked or
    expired key (`code` missing_api_key, invalid_api_key, expired_api_key)."""
    state = request.config_dict[STATE]
    key = bearer_token(request)
    if key is None:
        raise ApiError(
            401,
            "missing API key: send 'Authorization: Bearer <your API key>'",
            type="authentication_error",
            code="missing_api_key",
        )
    now = time.time()
    caller = state.keys.get(key, now)
    if caller is None:
        found = await state.ledger.authenticate_key(key)
        if found is not None:
            caller = Caller(found[0], hash_key(key), found[1])
            state.keys.put(caller, now)
    if caller is None:
        raise ApiError(401, "the API key is not valid", type="authentication_error", code="invalid_api_key")
    expires = caller.limits.expires_at
    if expires is not None and now >= expires:
        raise ApiError(
            401,
            f"the API key expired at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires))}; "
            "ask the operator for a new one",
            type="authentication_error",
            code="expired_api_key",
        )
    return caller
