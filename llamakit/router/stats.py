"""One snapshot of the router for the operator's dashboard: herd, queues, fees, requests and agents."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict
from typing import Any

from llamakit.money.fees import format_bid
from llamakit.router.limits import key_view
from llamakit.router.state import RouterState

__all__ = ["snapshot", "start_of_day"]


def start_of_day(now: float) -> float:
    """Midnight UTC of the day `now` (epoch seconds) falls in: where the dashboard's "today" begins."""
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


async def snapshot(state: RouterState) -> dict[str, Any]:
    """The dashboard's snapshot. `accounts` (today = since midnight UTC) and `fees` come from the ledger, so they
    are herd-wide when several routers share one database; `requests` are this router's own, and so is `queue`
    unless the routers run with --cluster, when it is the herd's (and `cluster` says which figure is which)."""
    ledger, herd = state.ledger, state.herd
    now = time.time()
    activity = await ledger.account_activity(start_of_day(now))
    names = {a.id: a.name for a in activity}
    books = await ledger.books()
    fees_by_node = await ledger.fees_by_node()
    savings = await ledger.cache_savings()
    view = await state.dispatch.herd_view(state.known_models())
    nodes = []
    for node in herd.nodes.values():
        entry = node.snapshot()
        # The ledger's figure survives restarts; the node's own counter only covers this run.
        entry["fees_earned"] = fees_by_node.get(node.name, 0)
        if view.busy is not None:  # the herd's running requests, every router's; `busy_here` this one's
            entry["busy_here"] = entry["busy"]
            entry["busy"] = view.busy.get(node.id, 0)
        nodes.append(entry)
    queue = {
        "total": sum(q["depth"] for q in view.queue.values()),
        "last_multiplier": float(view.last_multiplier),
        "last_multiplier_exact": format_bid(view.last_multiplier),
        "models": view.queue,
    }
    cluster: dict[str, Any] | None = None
    if view.cluster is not None:
        # Several routers: the queue and the busy slots are the herd's, from the database; what is counted
        # in this process (requests, latency, fees per minute, tokens/s, node requests) is this router's.
        cluster = {
            "router": view.cluster["router"],
            "leader": view.cluster["leader"],
            "routers": view.cluster["routers"],
            "herd_wide": ["nodes", "nodes[].busy", "nodes[].fees_earned", "queue", "fees.earned", "fees.by_node",
                          "fees.cached_tokens", "fees.cache_discount",
                          "books", "agents", "accounts", "keys", "refusals.today"],
            "per_router": ["nodes[].busy_here", "nodes[].requests", "nodes[].tokens_per_second", "fees.per_minute",
                           "requests", "refusals.by_status", "refusals.http_status", "uptime",
                           "queue.last_multiplier"],
            "dispatch": view.cluster["dispatch"],
        }  # fmt: skip
    return {
        "time": time.time(),
        "uptime": time.time() - state.started,
        **state.settings.money.describe(),  # what a credit is worth: fees and costs are in credits
        "nodes": nodes,
        "queue": queue,
        "fees": {
            "earned": books.charges,
            "per_minute": round(state.requests.fees_per_minute(), 2),
            "by_node": fees_by_node,
            # Prompt tokens read from the nodes' caches, and what their own fee took off the charges (credits).
            "cached_tokens": savings.cached_tokens,
            "cache_discount": savings.discount,
        },
        "books": {**asdict(books), "balanced": books.balanced},
        "requests": {
            "by_status": dict(state.requests.by_status),
            "total": sum(state.requests.by_status.values()),
            "latency_ms": state.requests.latency_percentiles(),
            "recent": list(state.requests.recent)[-50:],
        },
        "agents": await ledger.event_summary(),
        "accounts": [asdict(a) for a in activity],
        # Keys with a limit, as `GET /admin/keys/{key}` shows them, with their account's name.
        "keys": [
            {"account": names.get(k.account_id, str(k.account_id)), **key_view(k, None)}
            for k in await ledger.limited_keys()
        ],
        "refusals": {
            "today": sum(a.refusals for a in activity),
            "by_status": dict(state.requests.refused),
            "http_status": dict(state.requests.refused_status),  # each code's status, for codes no longer recent
        },
        "cluster": cluster,
    }
