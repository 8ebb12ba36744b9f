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
from pydantic import Field

from llamakit.money.currency import CreditValue
from llamakit.router.ledger import MAX_AMOUNT, MAX_PAGE, UsageRecord
from llamakit.router.routes.query import QueryModel, parse_query
from llamakit.wire.errors import ApiError

__all__ = ["AdminUsageParams", "UsageParams", "UsageQuery", "priced", "usage_page", "usage_query"]

# The largest record id the ledger takes (its `count` bound); past it `before` was a 500 (found by schemathesis).
MAX_ID = MAX_AMOUNT


class UsageParams(QueryModel):
    """The query of `GET /v1/account/usage`."""

    limit: int = Field(default=100, ge=1, le=MAX_PAGE, description="records per page")
    before: int | None = Field(default=None, ge=1, le=MAX_ID, description="a record id: the page holds older records")
    since: str | None = Field(
        default=None, description="epoch seconds, or an ISO 8601 date or time (UTC when no zone is given)"
    )
    user: str | None = Field(default=None, description="only the records of this `user` (OpenAI's field)")


class AdminUsageParams(UsageParams):
    """The query of `GET /admin/usage`: the tenant's, and one account's records (its name or id)."""

    account: str | None = Field(default=None, description="an account's name or id")


@dataclass(frozen=True)
class UsageQuery:
    limit: int
    before: int | None
    since: float | None
    user: str | None


def parse_since(raw: str) -> float:
    """Epoch seconds from `raw`: a number of seconds, or an ISO 8601 date or date and time (UTC unless zoned).
    ValueError when it is neither, or not a finite number (`nan` compares false with every time, so it would
    filter nothing out; `inf`, `-inf` and an overflow such as `1e400` name no time). Seconds are ASCII
    digits: `float()` would also read other scripts' digits and `1_0`."""
    try:
        seconds = float(raw) if raw.isascii() and "_" not in raw else None
    except ValueError:
        seconds = None
    if seconds is not None:
        if not math.isfinite(seconds):
            raise ValueError(f"not a finite number of seconds: {raw!r}")
        return seconds
    moment = dt.datetime.fromisoformat(raw)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def usage_query(request: web.Request) -> UsageQuery:
    params = parse_query(UsageParams, request)
    since: float | None = None
    if (raw := params.since) is not None:
        try:
            since = parse_since(raw)
        except ValueError:
            raise ApiError(
                400,
                f"query parameter 'since' must be epoch seconds or an ISO 8601 date or time, got {raw!r}",
                param="since",
            ) from None
    return UsageQuery(limit=params.limit, before=params.before, since=since, user=params.user or None)


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
