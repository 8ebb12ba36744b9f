"""One snapshot of the router for the operator's dashboard: herd, queues, fees, requests and agents."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict
from typing import Any, Final

from llamakit.money.fees import format_bid
from llamakit.router.herd import HerdNode
from llamakit.router.limits import key_view
from llamakit.router.state import RouterState

__all__ = ["AGENTS_SHOWN", "BATCHES_SHOWN", "KEYS_SHOWN", "NODES_SHOWN", "TOP_ACCOUNTS", "snapshot", "start_of_day"]

# What one snapshot carries at most: with the rest of it, well under 64 KiB however many tenants there are.
TOP_ACCOUNTS: Final = 50
KEYS_SHOWN: Final = 25
NODES_SHOWN: Final = 100
AGENTS_SHOWN: Final = 50
BATCHES_SHOWN: Final = 5


def start_of_day(now: float) -> float:
    """Midnight UTC of the day `now` (epoch seconds) falls in: where the dashboard's "today" begins."""
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


async def snapshot(state: RouterState, batches_here: dict[str, int] | None = None) -> dict[str, Any]:
    """The dashboard's snapshot. `accounts` (today = since midnight UTC) and `fees` come from the ledger, so they
    are herd-wide when several routers share one database; `requests` are this router's own, and so is `queue`
    unless the routers run with --cluster, when it is the herd's (and `cluster` says which figure is which).

    Its size does not grow with the tenants, nor its time with the history: the ledger's running totals, the
    TOP_ACCOUNTS accounts that spent most today (then others by name, up to as many), the keys with limits of
    those accounts (then others, up to KEYS_SHOWN), at most NODES_SHOWN nodes and AGENTS_SHOWN agents; `counts`
    says how many there are in all, and the admin routes page through the rest (`GET /admin/accounts`,
    `/admin/keys`, `/admin/nodes`). `batches`: the open batches by status, their lines pending and running
    herd-wide, `batches_here` (this router's lines: see BatchRunner.here) and the BATCHES_SHOWN oldest.
    """
    ledger, herd = state.ledger, state.herd
    totals = await ledger.totals()
    accounts = await ledger.top_accounts(limit=TOP_ACCOUNTS)
    if len(accounts) < TOP_ACCOUNTS:  # a quiet day, or a small shop: the others by name, as many as fit
        shown = {a.id for a in accounts}
        others = await ledger.accounts_page(limit=TOP_ACCOUNTS)
        accounts += [a for a in others if a.id not in shown][: TOP_ACCOUNTS - len(accounts)]
    names = {a.id: a.name for a in accounts}
    keys = await ledger.limited_keys(accounts=list(names), limit=KEYS_SHOWN) if names else []
    if len(keys) < KEYS_SHOWN:
        seen = {k.prefix for k in keys}
        keys += [k for k in await ledger.limited_keys(limit=KEYS_SHOWN) if k.prefix not in seen][
            : KEYS_SHOWN - len(keys)
        ]
        names |= await ledger.account_names([k.account_id for k in keys if k.account_id not in names])
    fees_by_node = await ledger.fees_by_node()
    savings = await ledger.cache_savings()
    view = await state.dispatch.herd_view(state.known_models())
    nodes = []
    shown_nodes = _nodes_shown(list(herd.nodes.values()))
    for node in shown_nodes:
        entry = node.snapshot()
        # The ledger's figure survives restarts; the node's own counter only covers this run.
        entry["fees_earned"] = fees_by_node.get(node.name, 0)
        if view.busy is not None:  # the herd's running requests, every router's; `busy_here` this one's
            entry["busy_here"] = entry["busy"]
            entry["busy"] = view.busy.get(node.id, 0)
        nodes.append(entry)
    earners = sorted(fees_by_node, key=lambda n: -fees_by_node[n])[:NODES_SHOWN]
    shown_fees = {n: fees_by_node[n] for n in sorted({*earners, *(n.name for n in shown_nodes)}) if n in fees_by_node}
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
                          "books", "agents", "accounts", "keys", "refusals.today", "counts", "today",
                          "this_month"],
            "per_router": ["nodes[].busy_here", "nodes[].requests", "nodes[].tokens_per_second", "fees.per_minute",
                           "requests", "refusals.by_status", "refusals.http_status", "uptime",
                           "queue.last_multiplier"],
            "dispatch": view.cluster["dispatch"],
        }  # fmt: skip
    books = totals.books
    batches = await _batches(state, batches_here)
    agents = await ledger.event_summary()
    latest_agents = sorted(agents, key=lambda name: -agents[name]["last"])[:AGENTS_SHOWN]
    return {
        "time": time.time(),
        "uptime": time.time() - state.started,
        **state.settings.money.describe(),  # what a credit is worth: fees and costs are in credits
        "nodes": nodes,
        "queue": queue,
        "fees": {
            "earned": books.charges,
            "per_minute": round(state.requests.fees_per_minute(), 2),
            "by_node": shown_fees,
            # Prompt tokens read from the nodes' caches, and what their own fee took off the charges (credits).
            "cached_tokens": savings.cached_tokens,
            "cache_discount": savings.discount,
        },
        "books": {**asdict(books), "balanced": books.balanced, "audit": state.auditor.view()},
        "requests": {
            "by_status": dict(state.requests.by_status),
            "total": sum(state.requests.by_status.values()),
            "latency_ms": state.requests.latency_percentiles(),
            "recent": list(state.requests.recent)[-50:],
        },
        "agents": {name: agents[name] for name in sorted(latest_agents)},
        "accounts": [vars(a).copy() for a in accounts],  # as asdict, a tenth of its time
        # Keys with a limit, as `GET /admin/keys/{key}` shows them, with their account's name.
        "keys": [{"account": names.get(k.account_id, str(k.account_id)), **key_view(k, None)} for k in keys],
        "counts": {
            "accounts": totals.accounts,
            "accounts_shown": len(accounts),
            "accounts_active_today": totals.today.accounts,
            "keys_shown": len(keys),
            "nodes": len(herd.nodes),
            "nodes_shown": len(nodes),
            "agents": len(agents),
            "requests": totals.requests,  # usage records ever, archived ones too
        },
        "today": asdict(totals.today),
        "this_month": asdict(totals.month),
        "refusals": {
            "today": totals.today.refusals,
            "by_status": dict(state.requests.refused),
            "http_status": dict(state.requests.refused_status),  # each code's status, for codes no longer recent
        },
        "batches": batches,
        "cluster": cluster,
    }


async def _batches(state: RouterState, here: dict[str, int] | None) -> dict[str, Any]:
    overview = await state.ledger.batch_store.overview(limit=BATCHES_SHOWN)
    return {
        "open": overview.open,
        "lines": {"pending": overview.pending, "running": overview.running},
        "here": here or {},
        "shown": [
            {
                "id": batch.id,
                "account": account,
                "endpoint": batch.endpoint,
                "model": batch.model,
                "status": batch.status,
                "created": batch.created,
                "total": batch.total,
                "completed": batch.completed,
                "failed": batch.failed,
                "cost_credits": batch.cost,
            }
            for batch, account in overview.shown
        ],
    }


def _nodes_shown(nodes: list[HerdNode]) -> list[HerdNode]:
    """At most NODES_SHOWN nodes: every one in a small herd; in a large one, those not ready first (what an operator
    looks for), then the busiest, by name among equals."""
    if len(nodes) <= NODES_SHOWN:
        return nodes
    picked = sorted(nodes, key=lambda n: (n.state == "ready", -n.busy, n.name))[:NODES_SHOWN]
    return sorted(picked, key=lambda n: n.name)
