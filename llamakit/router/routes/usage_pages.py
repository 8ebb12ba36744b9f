"""Pages of usage records for `GET /v1/account/usage` and `GET /admin/usage`: query parsing and the page body.

Query: `limit` (1 to 1000, default 100), `before` (a record id: the page holds older records), `since` (epoch
seconds or an ISO 8601 date or time, UTC when no zone is given), `user` (OpenAI's `user` field); the admin
route also takes `account` (a name). A value out of range is a 400 that says the range. The page says
`has_more: true` only when an older record exists, so a page that ends at the last record says there is none.
Each record is priced at the credit value and currency it was sold at, which the ledger keeps with it.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from llamakit.money.currency import CreditValue
from llamakit.router.ledger import MAX_PAGE, UsageRecord
from llamakit.wire.errors import ApiError

__all__ = ["UsageQuery", "priced", "query_int", "usage_page", "usage_query"]

MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class UsageQuery:
    limit: int
    before: int | None
    since: float | None
    user: str | None


def query_int(request: web.Request, name: str, low: int, high: int) -> int | None:
    """The integer query parameter `name`, None when absent; a 400 naming the range when out of it."""
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name!r} must be an integer, got {raw!r}", param=name) from None
    if not low <= value <= high:
        raise ApiError(400, f"query parameter {name!r} must be between {low} and {high}, got {value}", param=name)
    return value


def parse_since(raw: str) -> float:
    """Epoch seconds from `raw`: a number of seconds, or an ISO 8601 date or date and time (UTC unless zoned).
    ValueError when it is neither, or not a finite number (`nan` compares false with every time, so it would
    filter nothing out; `inf`, `-inf` and an overflow such as `1e400` name no time)."""
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"not a finite number of seconds: {raw!r}")
        return seconds
    moment = dt.datetime.fromisoformat(raw)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def usage_query(request: web.Request) -> UsageQuery:
    limit = query_int(request, "limit", 1, MAX_PAGE)
    before = query_int(request, "before", 1, MAX_ID)
    since: float | None = None
    if (raw := request.query.get("since")) is not None:
        try:
            since = parse_since(raw)
        except ValueError:
            raise ApiError(
                400,
                f"query parameter 'since' must be epoch seconds or an ISO 8601 date or time, got {raw!r}",
                param="since",
            ) from None
    user = request.query.get("user") or None
    return UsageQuery(limit=100 if limit is None else limit, before=before, since=since, user=user)


def priced(record: UsageRecord, current: CreditValue) -> dict[str, Any]:
    """A record's price fields: `cost` and `cost_credits`, `cache_discount` and `cache_discount_credits` (what its
    cached prompt tokens' fee took off the cost), `currency`, `credit_value` (a number) and `credit_value_exact`
    (its decimal text) of the money it was priced at when it was made, and `priced_at_current_value`, true for a
    record made before the ledger kept that (priced at `current` then)."""
    money, at_current = record.priced_at(current)
    return {
        **money.cost_fields(record.cost),
        **money.discount_fields(record.cache_discount),
        **money.describe(),
        "priced_at_current_value": at_current,
    }


async def usage_page(
    query: UsageQuery, fetch: Callable[[int, int | None], Awaitable[list[UsageRecord]]], money: CreditValue
) -> dict[str, Any]:
    """The page body: `fetch(limit, before)` is asked for one record more than the page holds, to tell whether
    an older one exists. A record's `cost_credits` is what the ledger charged, `cost` its price in `currency` at
    the credit value it was sold at (see `priced`); `money` is the router's, for records that kept none."""
    records = await fetch(min(query.limit + 1, MAX_PAGE + 1), query.before)
    page, more = records[: query.limit], len(records) > query.limit
    return {
        "object": "list",
        "data": [{**asdict(r), "total_tokens": r.total_tokens, **priced(r, money)} for r in page],
        "has_more": more,
        "next_before": page[-1].id if page and more else None,
    }
