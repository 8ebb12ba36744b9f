"""Who a tenant's request comes from: its API key (`Authorization: Bearer …`), through a short-lived cache."""

from __future__ import annotations

import time

from aiohttp import web

from llamakit.router.ledger import hash_key
from llamakit.router.limits import Caller
from llamakit.router.state import STATE
from llamakit.web import bearer_token
from llamakit.wire.errors import ApiError

__all__ = ["authenticate"]


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
