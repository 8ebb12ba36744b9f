"""One snapshot of the router for the operator's dashboard: herd, queues, fees, requests and agents."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from llamakit.fees import format_bid
from llamakit.router.state import RouterState

__all__ = ["snapshot"]


async def snapshot(state: RouterState) -> dict[str, Any]:
    ledger, herd, scheduler = state.ledger, state.herd, state.scheduler
    books = await ledger.books()
    fees_by_node = await ledger.fees_by_node()
    nodes = []
    for node in herd.nodes.values():
        entry = node.snapshot()
        # The ledger's figure survives restarts; the node's own counter only covers this run.
        entry["fees_earned"] = fees_by_node.get(node.name, 0)
        nodes.append(entry)
    models = sorted(set(state.known_models()) | set(scheduler.queues))
    states = [n["state"] for n in nodes]
    for name in ("ready", "draining", "down"):
        state.metrics.nodes.labels(name).set(states.count(name))
    return {
        "time": time.time(),
        "uptime": time.time() - state.started,
        "nodes": nodes,
        "queue": {
            "total": scheduler.queue_length(),
            "last_multiplier": float(scheduler.last_multiplier),
            "last_multiplier_exact": format_bid(scheduler.last_multiplier),
            "models": {
                m: {"depth": scheduler.queue_length(m), "oldest_wait": round(scheduler.oldest_wait(m), 3)}
                for m in models
            },
        },
        "fees": {
            "earned": books.charges,
            "per_minute": round(state.requests.fees_per_minute(), 2),
            "by_node": fees_by_node,
        },
        "books": {**asdict(books), "balanced": books.balanced},
        "requests": {
            "by_status": dict(state.requests.by_status),
            "total": sum(state.requests.by_status.values()),
            "latency_ms": state.requests.latency_percentiles(),
            "recent": list(state.requests.recent)[-50:],
        },
        "agents": await ledger.event_summary(),
    }
