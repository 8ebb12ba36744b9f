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
from pydantic import BaseModel, Field

from llamakit.money.fees import MAX_BID, FeeSchedule, hold_amount
from llamakit.router.batches.runner import RUNNER
from llamakit.router.herd import HerdNode
from llamakit.router.ledger import MAX_AMOUNT, Account, AccountExists, Ledger, LedgerError, UnknownAccount, UsageRecord
from llamakit.router.limits import key_limits
from llamakit.router.openapi import Operation, documented
from llamakit.router.pricing import DEFAULT_KEY
from llamakit.router.routes.answers import (
    AccountAnswer,
    BooksAnswer,
    Deposit,
    DepositAnswer,
    FeesDeleted,
    FeesSet,
    HeartbeatAnswer,
    Joined,
    Left,
    NewAccount,
    NewAccountAnswer,
    NodeHeartbeat,
    NodeJoin,
    NodeLeave,
    NodeRemoved,
    NodeView,
    Stats,
    UsagePage,
    parse_body,
)
from llamakit.router.routes.query import QueryModel, parse_query
from llamakit.router.routes.usage_pages import AdminUsageParams, usage_page, usage_query
from llamakit.router.settings import RouterSettings
from llamakit.router.state import STATE
from llamakit.router.stats import snapshot
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


def _admin(summary: str, answer: Any, *errors: int, **more: Any) -> Operation:
    return Operation(summary=summary, auth="admin_key", answer=answer, errors=errors, **more)


@admin_routes.post("/accounts")
@documented(_admin("Open an account: its first API key, limits and deposit", NewAccountAnswer, 400, 409,
                   status=201, body=NewAccount))  # fmt: skip
async def create_account(request: web.Request) -> web.Response:
    ledger = request.config_dict[STATE].ledger
    body = parse_body(NewAccount, parse_json(await request.read()))
    # Checked before the account is made (a bad limit; a deposit over MAX_AMOUNT, by the model).
    limits = key_limits(body.limits)
    try:
        account = await ledger.create_account(body.name, kind=body.kind)
    except AccountExists as exc:
        raise ApiError(409, str(exc), code="account_exists", param="name") from exc
    except ValueError as exc:
        raise ApiError(400, str(exc), param="name") from exc
    key = await ledger.create_key(account.id, limits=limits)
    if body.deposit:
        await ledger.deposit(account.id, body.deposit, note="opening deposit")
    return json_response({**await _account_json(request, account), "api_key": key}, status=201)


@admin_routes.get("/accounts/{account}")
@documented(_admin("One account (by id or name) and its books", AccountAnswer, 404))
async def get_account(request: web.Request) -> web.Response:
    return json_response(await _account_json(request, await account_of(request)))


@admin_routes.post("/accounts/{account}/deposits")
@documented(_admin("Deposit credits on an account", DepositAnswer, 400, 404, status=201, body=Deposit))
async def deposit(request: web.Request) -> web.Response:
    account = await account_of(request)
    body = parse_body(Deposit, parse_json(await request.read()))
    amount = body.amount
    try:
        balance = await request.config_dict[STATE].ledger.deposit(account.id, amount, note=body.note)
    except ValueError as exc:  # the balance would pass MAX_AMOUNT
        raise ApiError(400, str(exc), param="amount") from exc
    return json_response({"account": account.name, "deposited": amount, "balance": balance}, status=201)


@admin_routes.get("/fees")
@documented(_admin("Every model's fees in credits ('*': the default)", dict[str, FeeSchedule]))
async def get_fees(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    return json_response(state.prices.to_dict(state.known_models()))


class FeesParams(QueryModel):
    """The query of `PUT /admin/fees/{model}`."""

    unserved: bool = Field(default=False, description="set the fees of a model no node serves yet")


@admin_routes.put("/fees/{model}")
@documented(_admin("Set a model's fees ('*': the default)", FeesSet, 400, 404, body=FeeSchedule, query=FeesParams))
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
    ahead = parse_query(FeesParams, request).unserved
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
@documented(_admin("Remove a model's own fees", FeesDeleted, 400, 404))
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


@admin_routes.post("/nodes/{node}/drain")
@documented(_admin("Drain a node: it finishes what it runs and gets nothing new", NodeView, 404))
async def drain_node(request: web.Request) -> web.Response:
    node = _node(request)
    node.draining = True
    await request.config_dict[STATE].dispatch.draining(node, True)  # at every router; waiting requests learn at once
    return json_response(node.snapshot())


@admin_routes.post("/nodes/{node}/undrain")
@documented(_admin("Give a drained node work again", NodeView, 404))
async def undrain_node(request: web.Request) -> web.Response:
    node = _node(request)
    node.draining = False
    await request.config_dict[STATE].dispatch.draining(node, False)
    return json_response(node.snapshot())


@admin_routes.delete("/nodes/{node}")
@documented(_admin("Remove a node from the herd", NodeRemoved, 404))
async def remove_node(request: web.Request) -> web.Response:
    node = _node(request)
    state = request.config_dict[STATE]
    # Requests in flight on it finish (they hold their own reference); it gets nothing new.
    node.draining = True
    state.herd.remove(node.id)
    await state.dispatch.removed(node)
    return json_response({"removed": node.id})


@admin_routes.get("/stats")
@documented(_admin("The dashboard's snapshot: herd, queue, fees, requests, books", Stats))
async def stats(request: web.Request) -> web.Response:
    return json_response(await snapshot(request.config_dict[STATE], request.config_dict[RUNNER].here()))


class StatsStreamParams(QueryModel):
    """The query of `GET /admin/stats/stream`."""

    interval: float = Field(default=1.0, ge=0.1, le=60, description="seconds between snapshots")


@admin_routes.get("/stats/stream")
@documented(_admin("The snapshot as Server-Sent Events, every `interval` seconds", None, 400, stream=Stats,
                   stream_only=True, query=StatsStreamParams))  # fmt: skip
async def stats_stream(request: web.Request) -> web.StreamResponse:
    """The snapshot pushed as Server-Sent Events every `interval` seconds (default 1) until the client leaves."""
    interval = parse_query(StatsStreamParams, request).interval
    state = request.config_dict[STATE]
    sse = await SseWriter.open(request)
    try:
        # Until the client leaves or the router shuts down: a watching dashboard must not hold up a stop.
        while not state.stopping.is_set():
            await sse.send(await snapshot(state, request.config_dict[RUNNER].here()))
            with suppress(TimeoutError):
                await asyncio.wait_for(state.stopping.wait(), interval)
        await sse.done()
    except (ConnectionError, LedgerError):  # the client left, or the router closed its ledger
        pass
    return sse.response


@admin_routes.get("/books")
@documented(_admin("The ledger's totals (credits): deposits = balances + holds + charges", BooksAnswer))
async def books(request: web.Request) -> web.Response:
    """The books from the running totals, and what the last audit found (`audit`; see llamakit.router.auditor)."""
    state = request.config_dict[STATE]
    books = await state.ledger.books()
    return json_response({**asdict(books), "balanced": books.balanced, "audit": state.auditor.view()})


@admin_routes.post("/books/audit")
@documented(_admin("Audit the books now: a full scan of the history against the running totals", BooksAnswer, 503))
async def audit_books(request: web.Request) -> web.Response:
    """Audit the books now (a full scan of the history, off the paid path) and answer with what it found:
    `audit.ok` false, and the discrepancies, when the running totals disagree with the history. 503 when the
    ledger cannot be read."""
    state = request.config_dict[STATE]
    try:
        await state.auditor.run()
    except LedgerError as exc:
        raise ApiError(503, f"the audit could not read the ledger: {exc}", type="server_error") from exc
    books = await state.ledger.books()
    return json_response({**asdict(books), "balanced": books.balanced, "audit": state.auditor.view()})


@admin_routes.get("/usage")
@documented(_admin("Every account's usage records, paged", UsagePage, 400, 404, query=AdminUsageParams))
async def usage(request: web.Request) -> web.Response:
    """Every account's usage records (or one account's: `?account=NAME` or its id), paged and filtered as
    `GET /v1/account/usage`; each record names its account."""
    ledger = request.config_dict[STATE].ledger
    query = usage_query(request)
    account = None
    if (ref := request.query.get("account")) is not None:  # an id or a name, as in the other admin routes
        account = (await find_account(ledger, ref, param="account")).id

    async def fetch(limit: int, before: int | None) -> list[UsageRecord]:
        if account is not None:
            return await ledger.usage_records(account, limit=limit, before=before, since=query.since, user=query.user)
        return await ledger.all_usage(limit, before=before, since=query.since, user=query.user)

    page = await usage_page(query, fetch, request.config_dict[STATE].settings.money)
    names = await ledger.account_names([record["account_id"] for record in page["data"]])
    for record in page["data"]:
        record["account"] = names.get(record["account_id"])
    return json_response(page)


def _herd(summary: str, answer: Any, body: type[BaseModel], *errors: int, status: int = 200) -> Operation:
    return Operation(summary=summary, auth="herd_token", answer=answer, body=body, errors=(400, *errors), status=status)


@herd_routes.post("/join")
@documented(_herd("A node joins the herd (or joins again after a restart)", Joined, NodeJoin, status=201))
async def join(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    body = parse_body(NodeJoin, parse_json(await request.read()))
    node = state.herd.join(url=body.url, name=body.name, models=body.models, slots=body.slots)
    await state.dispatch.joined(node)  # with --cluster, every router on the database knows it
    return json_response({"id": node.id, "heartbeat_seconds": state.settings.health_interval}, status=201)


@herd_routes.post("/heartbeat")
@documented(_herd("A joined node says it lives, and what it serves", HeartbeatAnswer, NodeHeartbeat, 404))
async def heartbeat(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    body = parse_body(NodeHeartbeat, parse_json(await request.read()))
    node = state.herd.get(body.name)
    if node is None:
        raise ApiError(404, "this node has not joined (or was removed): POST /herd/join", type="not_found_error")
    if body.status == "ready" and state.herd.seen(node, models=body.models, slots=body.slots):
        await state.dispatch.came_back(node)
    return json_response({"id": node.id, "state": node.state})


@herd_routes.post("/leave")
@documented(_herd("A node leaves the herd", Left, NodeLeave))
async def leave(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    body = parse_body(NodeLeave, parse_json(await request.read()))
    node = state.herd.remove(body.name)
    if node is not None:
        await state.dispatch.removed(node)
    return json_response({"removed": node.id if node else None})
