"""The operator's routes (`admin_routes`, mounted at `/admin/`) and the herd's (`herd_routes`, at `/herd/`).

Each table is served by its own sub-application, whose middleware (`llamakit.router.auth`) has checked the admin
key or the herd token before a handler here runs; the paths below are relative to the mount point.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from dataclasses import asdict
from typing import Any

from aiohttp import web

from llamakit.money.fees import MAX_BID, FeeSchedule, hold_amount
from llamakit.router.herd import HerdNode
from llamakit.router.ledger import MAX_AMOUNT, Account, AccountExists, Ledger, LedgerError, UnknownAccount, UsageRecord
from llamakit.router.limits import key_limits
from llamakit.router.pricing import DEFAULT_KEY
from llamakit.router.routes.usage_pages import usage_page, usage_query
from llamakit.router.settings import RouterSettings
from llamakit.router.state import STATE
from llamakit.router.stats import snapshot
from llamakit.text import unsafe_at
from llamakit.web import SseWriter, json_response
from llamakit.wire.completions import parse_json
from llamakit.wire.errors import ApiError

__all__ = ["account_of", "admin_routes", "find_account", "herd_routes"]

admin_routes = web.RouteTableDef()
herd_routes = web.RouteTableDef()


async def account_of(request: web.Request) -> Account:
    """The account of the route's `{account}`, an id or a name; 404 `account_not_found` when there is none."""
    return await find_account(request.config_dict[STATE].ledger, request.match_info["account"])


async def find_account(ledger: Ledger, ref: str, *, param: str | None = None) -> Account:
    """The account `ref` names: its id (ASCII digits, up to the ledger's largest id) or else its name; 404
    `account_not_found` (naming `param`, when the reference came in one) when there is none."""
    # A longer number cannot be an id: the ledger refuses it, and SQLite overflows past 2^63 (both were a 500).
    is_id = ref.isascii() and ref.isdigit() and len(ref) <= len(str(MAX_AMOUNT)) and int(ref) <= MAX_AMOUNT
    try:
        return await (ledger.get_account(int(ref)) if is_id else ledger.account_by_name(ref))
    except UnknownAccount as exc:
        raise ApiError(404, str(exc), type="not_found_error", code="account_not_found", param=param) from exc


async def _account_json(request: web.Request, account: Account) -> dict[str, Any]:
    books = await request.config_dict[STATE].ledger.account_state(account.id)
    return {"id": account.id, "name": account.name, "kind": account.kind, **asdict(books)}


def _positive_int(body: dict[str, Any], name: str, *, default: int | None = None) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ApiError(400, f"{name!r} must be a non-negative whole number of credits, got {value!r}", param=name)
    # Checked here, not left to the ledger: create_account would otherwise make the account, then fail the deposit.
    if value > MAX_AMOUNT:
        raise ApiError(400, f"{name!r} must be at most {MAX_AMOUNT} credits, got {value}", param=name)
    return value


@admin_routes.get("/accounts")
async def list_accounts(request: web.Request) -> web.Response:
    ledger = request.config_dict[STATE].ledger
    return json_response({"data": [await _account_json(request, a) for a in await ledger.list_accounts()]})


@admin_routes.post("/accounts")
async def create_account(request: web.Request) -> web.Response:
    ledger = request.config_dict[STATE].ledger
    body = parse_json(await request.read())
    name, kind = body.get("name"), body.get("kind", "user")
    deposit = _positive_int(body, "deposit", default=0)
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, "an account needs a 'name'", param="name")
    if kind not in ("user", "agent", "dev"):
        raise ApiError(400, f"'kind' must be user, agent or dev, got {kind!r}", param="kind")
    key_limits(body.get("limits"))  # a bad limit is refused before the account is made
    try:
        account = await ledger.create_account(name.strip(), kind=kind)
    except AccountExists as exc:
        raise ApiError(409, str(exc), code="account_exists", param="name") from exc
    except ValueError as exc:
        raise ApiError(400, str(exc), param="name") from exc
    key = await ledger.create_key(account.id, limits=key_limits(body.get("limits")))
    if deposit:
        await ledger.deposit(account.id, deposit, note="opening deposit")
    return json_response({**await _account_json(request, account), "api_key": key}, status=201)


@admin_routes.get("/accounts/{account}")
async def get_account(request: web.Request) -> web.Response:
    return json_response(await _account_json(request, await account_of(request)))


@admin_routes.post("/accounts/{account}/deposits")
async def deposit(request: web.Request) -> web.Response:
    account = await account_of(request)
    body = parse_json(await request.read())
    amount = _positive_int(body, "amount")
    if amount == 0:
        raise ApiError(400, "'amount' must be at least 1 credit", param="amount")
    note = body.get("note", "")
    if not isinstance(note, str):
        raise ApiError(400, "'note' must be a string", param="note")
    try:
        balance = await request.config_dict[STATE].ledger.deposit(account.id, amount, note=note)
    except ValueError as exc:  # the balance would pass MAX_AMOUNT
        raise ApiError(400, str(exc), param="amount") from exc
    return json_response({"account": account.name, "deposited": amount, "balance": balance}, status=201)


@admin_routes.get("/fees")
async def get_fees(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    return json_response(state.prices.to_dict(state.known_models()))


@admin_routes.put("/fees/{model}")
async def set_fees(request: web.Request) -> web.Response:
    """Set a model's fees (`*`: the default) from `{"base_fee", "prompt_token_fee", "completion_token_fee"}` and
    optionally `cached_prompt_token_fee` (at most the prompt fee); they price the next request. 400 for a bad
    schedule; 404 `model_not_found` for a model no node serves and that has no fees yet, unless `?unserved=true`
    says it is meant (fees set before the model's nodes join)."""
    state = request.config_dict[STATE]
    try:
        fees = FeeSchedule.from_dict(parse_json(await request.read()))
    except ValueError as exc:
        raise ApiError(400, str(exc), param="fees") from exc
    _holdable(fees, state.settings)
    model = request.match_info["model"]
    # A typo would otherwise become a model: listed as available, in stats and the dashboard, and 503 no_node to
    # whoever asks for it. Pricing a model ahead of its nodes (a scale-out) stays possible, on purpose.
    ahead = request.query.get("unserved", "").lower() in ("1", "true")
    if not (model == DEFAULT_KEY or model in state.prices.per_model or state.herd.serves(model) or ahead):
        served = sorted({m for node in state.herd.nodes.values() for m in node.models})  # down nodes' too
        served_text = ", ".join(served) or "none (no node has joined yet)"
        raise ApiError(
            404,
            f"no node serves model {model!r}; models served: {served_text}. To set the fees of a model before its "
            "nodes join, PUT them with ?unserved=true (llamakit fees MODEL --unserved …)",
            type="not_found_error",
            code="model_not_found",
            param="model",
        )
    state.prices.set(model, fees)
    return json_response({"model": model, **fees.to_dict()})


def _holdable(fees: FeeSchedule, settings: RouterSettings) -> None:
    """400 `fees_too_high` unless the largest request the router takes could be held at `fees`: the highest bid,
    the most max_tokens it allows, and a prompt of a token per byte of the largest body it accepts. The ledger
    holds at most MAX_AMOUNT credits, so past that every large request would be refused (see `hold_credits`)."""
    limit, size = settings.max_tokens_limit, settings.max_body_bytes
    worst = hold_amount(fees, MAX_BID, size, limit)
    if worst > MAX_AMOUNT:
        raise ApiError(
            400,
            f"at these fees a request at bid {MAX_BID} for {limit} tokens with a {size}-byte prompt would hold "
            f"{worst} credits, and the ledger holds at most {MAX_AMOUNT}: set lower fees",
            param="fees",
            code="fees_too_high",
        )


@admin_routes.delete("/fees/{model}")
async def delete_fees(request: web.Request) -> web.Response:
    """Remove a model's own fees: a model some node serves goes back to the default fees, one no node serves is
    no longer a model here. Returns `{"model", "deleted": the fees removed, "fees": what the model costs now
    (null when no node serves it)}`; 404 `fees_not_found` when the model has no fees of its own, 400 for `*`."""
    state = request.config_dict[STATE]
    model = request.match_info["model"]
    if model == DEFAULT_KEY:
        raise ApiError(400, "the default fees ('*') cannot be deleted, only changed with PUT", param="model")
    deleted = state.prices.remove(model)
    if deleted is None:
        raise ApiError(
            404,
            f"model {model!r} has no fees of its own to delete (models with their own fees: "
            f"{', '.join(sorted(state.prices.per_model)) or 'none'})",
            type="not_found_error",
            code="fees_not_found",
            param="model",
        )
    now = state.prices.default.to_dict() if state.herd.serves(model) else None
    return json_response({"model": model, "deleted": deleted.to_dict(), "fees": now})


def _node(request: web.Request) -> HerdNode:
    node = request.config_dict[STATE].herd.get(request.match_info["node"])
    if node is None:
        raise ApiError(404, f"no node {request.match_info['node']!r} in the herd", type="not_found_error")
    return node


@admin_routes.get("/nodes")
async def list_nodes(request: web.Request) -> web.Response:
    return json_response({"data": [n.snapshot() for n in request.config_dict[STATE].herd.nodes.values()]})


@admin_routes.post("/nodes/{node}/drain")
async def drain_node(request: web.Request) -> web.Response:
    node = _node(request)
    node.draining = True
    await request.config_dict[STATE].dispatch.draining(node, True)  # at every router; waiting requests learn at once
    return json_response(node.snapshot())


@admin_routes.post("/nodes/{node}/undrain")
async def undrain_node(request: web.Request) -> web.Response:
    node = _node(request)
    node.draining = False
    await request.config_dict[STATE].dispatch.draining(node, False)
    return json_response(node.snapshot())


@admin_routes.delete("/nodes/{node}")
async def remove_node(request: web.Request) -> web.Response:
    node = _node(request)
    state = request.config_dict[STATE]
    # Requests in flight on it finish (they hold their own reference); it gets nothing new.
    node.draining = True
    state.herd.remove(node.id)
    await state.dispatch.removed(node)
    return json_response({"removed": node.id})


@admin_routes.get("/stats")
async def stats(request: web.Request) -> web.Response:
    return json_response(await snapshot(request.config_dict[STATE]))


@admin_routes.get("/stats/stream")
async def stats_stream(request: web.Request) -> web.StreamResponse:
    """The snapshot pushed as Server-Sent Events every `interval` seconds (default 1) until the client leaves."""
    try:
        interval = float(request.query.get("interval", "1"))
    except ValueError:
        raise ApiError(400, "'interval' must be a number of seconds", param="interval") from None
    if not 0.1 <= interval <= 60:
        raise ApiError(400, "'interval' must be between 0.1 and 60 seconds", param="interval")
    state = request.config_dict[STATE]
    sse = await SseWriter.open(request)
    try:
        # Until the client leaves or the router shuts down: a watching dashboard must not hold up a stop.
        while not state.stopping.is_set():
            await sse.send(await snapshot(state))
            with suppress(TimeoutError):
                await asyncio.wait_for(state.stopping.wait(), interval)
        await sse.done()
    except (ConnectionError, LedgerError):  # the client left, or the router closed its ledger
        pass
    return sse.response


@admin_routes.get("/books")
async def books(request: web.Request) -> web.Response:
    books = await request.config_dict[STATE].ledger.books()
    return json_response({**asdict(books), "balanced": books.balanced})


@admin_routes.get("/usage")
async def usage(request: web.Request) -> web.Response:
    """Every account's usage records (or one account's: `?account=NAME` or its id), paged and filtered as
    `GET /v1/account/usage`; each record names its account."""
    ledger = request.config_dict[STATE].ledger
    query = usage_query(request)
    names = {a.id: a.name for a in await ledger.list_accounts()}
    account = None
    if (ref := request.query.get("account")) is not None:  # an id or a name, as in the other admin routes
        account = (await find_account(ledger, ref, param="account")).id

    async def fetch(limit: int, before: int | None) -> list[UsageRecord]:
        if account is not None:
            return await ledger.usage_records(account, limit=limit, before=before, since=query.since, user=query.user)
        return await ledger.all_usage(limit, before=before, since=query.since, user=query.user)

    page = await usage_page(query, fetch, request.config_dict[STATE].settings.money)
    for record in page["data"]:
        record["account"] = names.get(record["account_id"])
    return json_response(page)


def _node_fields(body: dict[str, Any]) -> tuple[str, str, list[str], int]:
    url, name, models, slots = body.get("url"), body.get("name"), body.get("models"), body.get("slots")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ApiError(400, "'url' must be the node's http(s) URL", param="url")
    if not isinstance(name, str) or not name or len(name) > 64 or unsafe_at(name) is not None:
        raise ApiError(400, "'name' must be 1 to 64 characters of plain text on one line", param="name")
    if not isinstance(models, list) or not all(isinstance(m, str) and m and unsafe_at(m) is None for m in models):
        raise ApiError(400, "'models' must be a list of model names (plain text on one line)", param="models")
    if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= 1024:
        raise ApiError(400, "'slots' must be a whole number from 1 to 1024", param="slots")
    return url, name, models, slots


@herd_routes.post("/join")
async def join(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    url, name, models, slots = _node_fields(parse_json(await request.read()))
    node = state.herd.join(url=url, name=name, models=models, slots=slots)
    await state.dispatch.joined(node)  # with --cluster, every router on the database knows it
    return json_response({"id": node.id, "heartbeat_seconds": state.settings.health_interval}, status=201)


@herd_routes.post("/heartbeat")
async def heartbeat(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    body = parse_json(await request.read())
    node = state.herd.get(str(body.get("name")))
    if node is None:
        raise ApiError(404, "this node has not joined (or was removed): POST /herd/join", type="not_found_error")
    models = body.get("models")
    slots = body.get("slots")
    ok_models = isinstance(models, list) and all(isinstance(m, str) for m in models)
    ok_slots = isinstance(slots, int) and not isinstance(slots, bool) and slots >= 1
    if body.get("status", "ready") == "ready" and state.herd.seen(
        node, models=models if ok_models else None, slots=slots if ok_slots else None
    ):
        await state.dispatch.came_back(node)
    return json_response({"id": node.id, "state": node.state})


@herd_routes.post("/leave")
async def leave(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    body = parse_json(await request.read())
    node = state.herd.remove(str(body.get("name")))
    if node is not None:
        await state.dispatch.removed(node)
    return json_response({"removed": node.id if node else None})
