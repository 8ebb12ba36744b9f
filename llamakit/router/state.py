"""Everything one router holds while it runs, in one typed object stored on the app."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from llamakit.catalog import DEFAULT_MODEL
from llamakit.outage import Outage
from llamakit.router.affinity import PrefixMap
from llamakit.router.auditor import Auditor
from llamakit.router.dispatch import Dispatcher
from llamakit.router.herd import Herd
from llamakit.router.ledger import Ledger
from llamakit.router.ledger_gate import LedgerGate
from llamakit.router.limits import KeyCache, KeyRates
from llamakit.router.metrics import RouterMetrics
from llamakit.router.paid.idempotency import Idempotency
from llamakit.router.pricing import PriceList
from llamakit.router.settings import RouterSettings
from llamakit.router.upstream import Upstream
from llamakit.telemetry import Tracing

__all__ = ["STATE", "RequestLog", "RouterState", "UsageLog"]

log = logging.getLogger(__name__)


class UsageLog:
    """One JSON line per settled request, written whole with a single write so lines never interleave. A line
    that cannot be written (a full disk) is lost, said once per outage: the ledger has every usage record."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self.outage = Outage(log, f"writing the usage log {path}", cost="lines lost")

    def write(self, record: dict[str, Any]) -> None:
        try:
            os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
        except OSError as exc:
            self.outage.failed(exc, consequence="its lines are lost until it can be written again; the ledger "
                                                "keeps every usage record")  # fmt: skip
            self.outage.count()
        else:
            if self.outage.down:
                self.outage.ended()

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class RequestLog:
    """Recent requests and counters for the dashboard: what happened, not what it cost (the ledger knows)."""

    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=200))
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    fees: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=10000))
    by_status: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # by error code: records with an http_status
    refused_status: dict[str, int] = field(default_factory=dict)  # each error code's HTTP status, as last seen

    def add(self, record: dict[str, Any]) -> None:
        self.recent.append(record)
        self.by_status[record["status"]] += 1
        if record.get("http_status") is not None:
            self.refused[record["status"]] += 1
            self.refused_status[record["status"]] = record["http_status"]
        if record.get("latency_ms") is not None and record["status"] in ("ok", "cut"):
            self.latencies.append(record["latency_ms"])
        if record.get("cost_credits"):
            self.fees.append((time.time(), record["cost_credits"]))

    def fees_per_minute(self, window: float = 60.0) -> float:
        cutoff = time.time() - window
        return sum(c for t, c in self.fees if t >= cutoff) * 60.0 / window

    def latency_percentiles(self) -> dict[str, float | None]:
        ordered = sorted(self.latencies)
        if not ordered:
            return {"p50": None, "p90": None, "p99": None}

        def at(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

        return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


@dataclass
class RouterState:
    settings: RouterSettings
    ledger: Ledger
    prices: PriceList
    herd: Herd
    # Where requests get node slots: in memory (one router), or the cluster's on PostgreSQL (--cluster), chosen
    # once at start-up; nothing else asks which (see llamakit.router.dispatch).
    dispatch: Dispatcher
    metrics: RouterMetrics
    idempotency: Idempotency
    upstream: Upstream | None = None
    tracing: Tracing | None = None  # OpenTelemetry traces, when the OTEL_* variables ask for them
    usage_log: UsageLog | None = None
    requests: RequestLog = field(default_factory=RequestLog)
    keys: KeyCache = field(default_factory=KeyCache)
    rates: KeyRates = field(default_factory=KeyRates)
    prefixes: PrefixMap = field(default_factory=PrefixMap)
    started: float = field(default_factory=time.time)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # set when the app shuts down
    gate: LedgerGate = field(default_factory=LedgerGate)  # closed while the ledger cannot be written
    auditor: Auditor = field(init=False)  # the books' audits (see llamakit.router.auditor)

    def __post_init__(self) -> None:
        self.auditor = Auditor(self.ledger, self.settings.audit_every)

    def known_models(self) -> list[str]:
        """Models a request may name: served by any node in the herd (even if down) or priced explicitly."""
        names = {m for node in self.herd.nodes.values() for m in node.models}
        return sorted(names | set(self.prices.per_model))

    def knows_model(self, model: str) -> bool:
        """Whether a request may name `model` (see `known_models`), without listing every model of the herd:
        the herd keeps the set of its models, so it costs as little in a herd of 1,000 as of one."""
        return model in self.prices.per_model or self.herd.serves(model)

    def default_model(self) -> str | None:
        """The model of a request that names none: the catalog default when it is served, else the first."""
        ready = self.herd.models()
        if DEFAULT_MODEL in ready:
            return DEFAULT_MODEL
        if ready:
            return ready[0]
        known = self.known_models()
        return known[0] if known else None


# The router's state on its application (sub-applications read it through `request.config_dict[STATE]`).
STATE = web.AppKey("state", RouterState)
