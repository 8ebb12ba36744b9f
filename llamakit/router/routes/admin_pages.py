"""The operator's paged lists (in the admin part, behind the admin key), for a dashboard or a script that pages
through a hundred thousand accounts, their keys or a herd of hundreds, a page at a time:

    GET /admin/accounts?limit=&order=name|spent_today&after=&search=   → {"data", "has_more", "next_after"}
    GET /admin/keys?limit=&after=&search=                              → the active keys that have a limit
    GET /admin/nodes?limit=&after=&search=                             → the herd, by name

`limit` is 1 to 1000 (default 1000 for accounts and keys; every node when not given); `after` is the
`next_after` of the previous page; `search` keeps what contains it in its name (any case; for keys: the name of
the key or of its account, or the prefix). An account shows its money now (`balance`, `held`), in all (`spent`,
`deposited`), today's UTC day (`today`: spent, requests, refusals) and when it was last seen. A bad value is a
400 that says what is wrong; each page costs the same however many there are.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from llamakit.router.herd import HerdNode
from llamakit.router.ledger import MAX_PAGE, AccountActivity, ApiKey
from llamakit.router.limits import key_view
from llamakit.router.openapi import Operation, documented
from llamakit.router.routes.answers import KeyView, NodeView
from llamakit.router.routes.query import QueryModel, parse_query
from llamakit.router.state import STATE
from llamakit.web import json_response
from llamakit.wire.errors import ApiError

__all__ = ["AccountsParams", "KeysParams", "NodesParams", "account_json", "page_routes"]

page_routes = web.RouteTableDef()

_SEARCH = Field(default=None, max_length=100, description="only those whose name contains this (any case)")
_AFTER = Field(default=None, description="the `next_after` of the previous page")


class AccountsParams(QueryModel):
    """The query of `GET /admin/accounts`."""

    limit: int = Field(default=MAX_PAGE, ge=1, le=MAX_PAGE, description="accounts per page")
    order: Literal["name", "spent_today"] = Field(
        default="name", description="by name, or by credits spent today (UTC; only who made a request today)"
    )
    after: str | None = _AFTER
    search: str | None = _SEARCH


class KeysParams(QueryModel):
    """The query of `GET /admin/keys`."""

    limit: int = Field(default=MAX_PAGE, ge=1, le=MAX_PAGE, description="keys per page")
    after: str | None = _AFTER
    search: str | None = Field(
        default=None, max_length=100, description="only keys whose name, account's name or prefix contains this"
    )


class NodesParams(QueryModel):
    """The query of `GET /admin/nodes`."""

    limit: int | None = Field(default=None, ge=1, le=MAX_PAGE, description="nodes per page (default: every one)")
    after: str | None = _AFTER
    search: str | None = _SEARCH


class _Page(BaseModel):
    model_config = ConfigDict(extra="allow")
    has_more: bool
    next_after: str | None = Field(description="where the next page starts (`after`), when there is one")


class TodayFigures(BaseModel):
    spent: int
    requests: int
    refusals: int


class AccountEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    name: str
    kind: str
    balance: int
    held: int
    spent: int | None = Field(description="credits charged in all")
    deposited: int | None
    today: TodayFigures = Field(description="the current UTC day's figures")
    last_seen: float | None = Field(description="the newest usage record (epoch seconds)")


class AccountPage(_Page):
    data: list[AccountEntry]


class LimitedKey(KeyView):
    account: str


class KeyPage(_Page):
    data: list[LimitedKey]


class NodePage(_Page):
    data: list[NodeView]


def _admin(summary: str, answer: Any, query: type[QueryModel]) -> Operation:
    return Operation(summary=summary, auth="admin_key", answer=answer, errors=(400,), query=query)


def account_json(account: AccountActivity) -> dict[str, Any]:
    return {
        "id": account.id,
        "name": account.name,
        "kind": account.kind,
        "balance": account.balance,
        "held": account.held,
        "spent": account.spent_total,
        "deposited": account.deposited,
        "today": {"spent": account.spent, "requests": account.requests, "refusals": account.refusals},
        "last_seen": account.last_seen,
    }


def _page(data: list[dict[str, Any]], limit: int, cursor: str | None) -> dict[str, Any]:
    """The body of a page fetched with one item more than `limit`, which tells whether there are more."""
    more = len(data) > limit
    return {"data": data[:limit], "has_more": more, "next_after": cursor if more else None}


@page_routes.get("/accounts")
@documented(_admin("Every account, a page at a time: by name or by spend today, searched by name", AccountPage,
                   AccountsParams))  # fmt: skip
async def list_accounts(request: web.Request) -> web.Response:
    ledger = request.config_dict[STATE].ledger
    query = parse_query(AccountsParams, request)
    try:
        found = await ledger.accounts_page(
            limit=query.limit + 1, order=query.order, after=query.after, search=query.search
        )
    except ValueError as exc:
        raise ApiError(400, str(exc), param="after") from exc
    shown = found[: query.limit]
    last = shown[-1] if shown else None
    cursor = None if last is None else (last.name if query.order == "name" else f"{last.spent}:{last.id}")
    return json_response(_page([account_json(a) for a in found], query.limit, cursor))


@page_routes.get("/keys")
@documented(_admin("The active keys that have a limit, a page at a time", KeyPage, KeysParams))
async def list_limited_keys(request: web.Request) -> web.Response:
    """The active keys that have a limit, by account, then age: what the dashboard's keys dialog pages through.
    A search reads up to ten thousand keys for a page; when they hold fewer matches than `limit`, the page says
    `has_more` with the place to read on from."""
    ledger = request.config_dict[STATE].ledger
    query = parse_query(KeysParams, request)
    limit, search = query.limit, query.search
    read = MAX_PAGE if search else limit + 1
    cursor = _key_cursor(query.after)
    matches: list[ApiKey] = []
    names: dict[int, str] = {}
    exhausted = False
    for _ in range(10 if search else 1):
        page = await ledger.limited_keys(limit=read, after=cursor)
        names |= await ledger.account_names(list({k.account_id for k in page} - set(names)))
        matches += [k for k in page if search is None or _key_matches(k, names.get(k.account_id, ""), search)]
        if len(page) < read:
            exhausted = True
            break
        cursor = (page[-1].account_id, page[-1].created, page[-1].prefix)
        if len(matches) > limit:
            break
    if len(matches) > limit:
        shown, more = matches[:limit], True
        cursor = (shown[-1].account_id, shown[-1].created, shown[-1].prefix)
    else:
        shown, more = matches, not exhausted
    data = [{"account": names.get(k.account_id, str(k.account_id)), **key_view(k, None)} for k in shown]
    next_after = f"{cursor[0]}:{cursor[1]!r}:{cursor[2]}" if more and cursor is not None else None
    return json_response({"data": data, "has_more": more, "next_after": next_after})


def _key_matches(key: ApiKey, account: str, search: str) -> bool:
    needle = search.lower()
    return any(needle in text.lower() for text in (key.name or "", account, key.prefix))


def _key_cursor(raw: str | None) -> tuple[int, float, str] | None:
    if raw is None:
        return None
    account, _, rest = raw.partition(":")
    created, _, prefix = rest.partition(":")
    try:
        return int(account), float(created), prefix
    except ValueError:
        raise ApiError(
            400, f"'after' must be the next_after of the previous page, got {raw!r}", param="after"
        ) from None


@page_routes.get("/nodes")
@documented(_admin("The herd's nodes by name: every one, or a page at a time", NodePage, NodesParams))
async def list_nodes(request: web.Request) -> web.Response:
    """The herd's nodes by name (`data`), as the dashboard shows them; a page of them with `limit`."""
    herd = request.config_dict[STATE].herd
    query = parse_query(NodesParams, request)
    search = (query.search or "").lower()
    nodes: list[HerdNode] = sorted(herd.nodes.values(), key=lambda n: n.name)
    if query.after is not None or search:
        nodes = [n for n in nodes if (query.after is None or n.name > query.after) and search in n.name.lower()]
    if query.limit is None:
        return json_response({"data": [n.snapshot() for n in nodes], "has_more": False, "next_after": None})
    page = nodes[: query.limit + 1]
    cursor = page[query.limit - 1].name if len(page) > query.limit else None
    return json_response(_page([n.snapshot() for n in page], query.limit, cursor))
