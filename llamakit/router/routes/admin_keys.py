"""The operator's routes for API keys (in the admin part with `admin_routes`, behind the admin key): make one
with a name and limits, list an account's, look one up, rename it or change its limits, revoke it. A key is
picked by its 8-character display prefix or given whole; its name is only a label to tell it by (free text, not
unique). The table's paths are relative to `/admin/`, where `create_app` mounts the part:

    POST   /admin/accounts/{account}/keys   {"name": "ci", "limits": {...}}  → 201 {"account", "api_key", "key"}
    GET    /admin/accounts/{account}/keys                                    → {"account", "data": [key, …]}
    GET    /admin/keys/{key}                                                 → key
    PATCH  /admin/keys/{key}                {"name": …, "limits": {...}}     → key (either or both; only the
                                                                                limits given change; null
                                                                                removes the name or a limit)
    DELETE /admin/keys/{key}                                                 → {"revoked": n}

A key is shown as `keys.key_view` makes it: prefix, name, state, limits, spend so far (credits) against its
caps. Errors: 400 for a bad name or limit or an ambiguous prefix, 404 for no such key or account.
"""

from __future__ import annotations

from aiohttp import web

from llamakit.router.ledger import ApiKey, LedgerError, UnknownKey
from llamakit.router.limits import key_limits, key_name_of, key_view
from llamakit.router.openapi import Operation, documented
from llamakit.router.routes.admin import account_of
from llamakit.router.routes.answers import KeyChange, KeyCreated, KeyList, KeyView, NewKey, Revoked, parse_body
from llamakit.router.state import STATE
from llamakit.web import json_response
from llamakit.wire.completions import parse_json
from llamakit.wire.errors import ApiError

__all__ = ["key_routes"]

key_routes = web.RouteTableDef()


@key_routes.post("/accounts/{account}/keys")
@documented(Operation(summary="Make an API key for an account, with a name and limits", auth="admin_key",
                      answer=KeyCreated, status=201, body=NewKey, errors=(400, 404)))  # fmt: skip
async def create_key(request: web.Request) -> web.Response:
    account = await account_of(request)
    body = parse_body(NewKey, parse_json(await request.read()) if request.can_read_body else {})
    limits = key_limits(body.limits)
    name = key_name_of(body.name)
    ledger = request.config_dict[STATE].ledger
    key = await ledger.create_key(account.id, limits=limits, name=name)
    return json_response({"account": account.name, "api_key": key, "key": key_view(await ledger.find_key(key), None)},
                         status=201)  # fmt: skip


@key_routes.get("/accounts/{account}/keys")
@documented(Operation(summary="An account's keys, active and revoked", auth="admin_key", answer=KeyList, errors=(404,)))
async def list_keys(request: web.Request) -> web.Response:
    """An account's keys by display prefix (the keys themselves are never kept), active and revoked."""
    account = await account_of(request)
    keys = await request.config_dict[STATE].ledger.list_keys(account.id)
    return json_response({"account": account.name, "data": [key_view(k, None) for k in keys]})


@key_routes.get("/keys/{key}")
@documented(Operation(summary="One key, by its prefix or whole", auth="admin_key", answer=KeyView, errors=(400, 404)))
async def get_key(request: web.Request) -> web.Response:
    return json_response(key_view(await _find(request), None))


@key_routes.patch("/keys/{key}")
@documented(Operation(summary="Rename a key or change its limits", auth="admin_key", answer=KeyView, body=KeyChange,
                      errors=(400, 404)))  # fmt: skip
async def change_key(request: web.Request) -> web.Response:
    """Rename a key or change its limits, or both: everything is checked before either changes."""
    body = parse_json(await request.read())
    unknown = sorted(set(body) - {"name", "limits"})
    if unknown or not body:
        what = f"unknown field {unknown[0]!r}; " if unknown else ""
        raise ApiError(400, f"{what}send {{'name': ...}} to rename the key (null removes its name) and/or "
                            "{'limits': {...}} with the limits to change (null removes one)",
                       param=unknown[0] if unknown else None)  # fmt: skip
    changes = body.get("limits")
    if "limits" in body:
        if not isinstance(changes, dict):
            raise ApiError(400, "send {'limits': {...}} with the limits to change (null removes one)", param="limits")
        key_limits(changes)  # 400 naming a bad field before the database is asked
    parse_body(KeyChange, body)
    name = key_name_of(body.get("name"))
    state = request.config_dict[STATE]
    selector = request.match_info["key"]
    try:
        if changes is None:
            key = await state.ledger.rename_key(selector, name)
        else:
            key = await state.ledger.set_key_limits(selector, changes)
            if "name" in body:
                key = await state.ledger.rename_key(selector, name)
    except UnknownKey as exc:
        raise ApiError(404, str(exc), type="not_found_error", code="key_not_found") from exc
    except (LedgerError, ValueError) as exc:
        raise ApiError(400, str(exc), param="key") from exc
    state.keys.clear()  # new limits apply at once here (other routers within KEY_CACHE_SECONDS)
    return json_response(key_view(key, None))


@key_routes.delete("/keys/{key}")
@documented(Operation(summary="Revoke a key: it stops working at once", auth="admin_key", answer=Revoked,
                      errors=(400, 404)))  # fmt: skip
async def revoke_key(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    state.keys.clear()  # a revoked key must stop working at once
    try:
        revoked = await state.ledger.revoke_key(request.match_info["key"])
    except (LedgerError, ValueError) as exc:
        raise ApiError(400, str(exc), param="key") from exc
    if not revoked:
        raise ApiError(404, "no active key matches", type="not_found_error", code="key_not_found")
    return json_response({"revoked": revoked})


async def _find(request: web.Request) -> ApiKey:
    try:
        return await request.config_dict[STATE].ledger.find_key(request.match_info["key"])
    except UnknownKey as exc:
        raise ApiError(404, str(exc), type="not_found_error", code="key_not_found") from exc
    except ValueError as exc:
        raise ApiError(400, str(exc), param="key") from exc
