"""The router's Prometheus metrics, in a registry of its own (one per app)."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from llamakit.router.herd import Herd
from llamakit.server import ConnectionCollector, ConnectionGuard

__all__ = ["RouterMetrics"]


# Refusals an operator watches for; their series exist (at 0) from the start, so rate() and alerts work at once.
KNOWN_REFUSALS = (
    (400, "invalid_value"),
    (400, "unsupported_field"),
    (401, "missing_api_key"),
    (401, "invalid_api_key"),
    (401, "expired_api_key"),
    (402, "insufficient_funds"),
    (402, "spend_cap_exceeded"),
    (403, "model_not_allowed"),
    (404, "model_not_found"),
    (408, "request_timeout"),
    (429, "queue_full"),
    (429, "queue_share_exceeded"),
    (429, "rate_limit_exceeded"),
    (503, "ledger_unavailable"),
    (503, "no_node"),
    (504, "queue_timeout"),
)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# The router's overhead is well under a millisecond on a quiet router; tens of milliseconds mean trouble.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
NODE_STATES = ("ready", "draining", "down")


class RouterMetrics:
    """Counters and histograms a router keeps about itself (per router: with several routers, sum across them).

    Series: requests and refusals by outcome, tokens, fees per node, queue depth and wait, end-to-end latency, the
    router's own overhead per request,
    time to first token of streams, completion tokens per second of each request, per-node state and slots,
    and the process, platform and garbage-collector collectors of prometheus_client.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._children: dict[tuple[object, ...], Any] = {}
        self._node_names: set[str] = set()
        self._watching = False
        self.refusals = Counter(
            "llamakit_router_refusals",
            "Requests refused, by HTTP status and error code (or type): 4xx the client's, 5xx the herd's.",
            ["status", "code"],
            registry=self.registry,
        )
        for status, code in KNOWN_REFUSALS:
            self.refusals.labels(str(status), code)
        self.latency = Histogram(
            "llamakit_router_request_duration_seconds",
            "Time from a paid request's arrival to its settlement or refund, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "llamakit_router_time_to_first_token_seconds",
            "Time from a stream's arrival to its first token sent to the client, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.token_rate = Histogram(
            "llamakit_router_completion_tokens_per_second",
            "Completion tokens per second of each request that produced some, from dispatch to its end, by model.",
            ["model"],
            buckets=RATE_BUCKETS,
            registry=self.registry,
        )
        self.node_state = Gauge(
            "llamakit_router_node_state",
            "1 for each node's state (ready, draining, down), 0 for the others.",
            ["node", "state"],
            registry=self.registry,
        )
        self.node_up = Gauge(
            "llamakit_router_node_up", "1 when the node is up (ready or draining).", ["node"], registry=self.registry
        )
        self.node_busy = Gauge(
            "llamakit_router_node_busy_slots", "Slots of the node running this router's requests.", ["node"],
            registry=self.registry,
        )  # fmt: skip
        self.node_slots = Gauge("llamakit_router_node_slots", "Slots the node has.", ["node"], registry=self.registry)
        self.requests = Counter(
            "llamakit_router_requests",
            "Finished requests by model and status.",
            ["model", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "llamakit_router_tokens",
            "Tokens settled, by model and kind (prompt, completion; prompt_cached: prompt tokens a node's cache held).",
            ["model", "kind"],
            registry=self.registry,
        )
        self.fees = Counter(
            "llamakit_router_fees_earned_credits", "Credits charged, by node.", ["node"], registry=self.registry
        )
        self.cache_discount = Counter(
            "llamakit_router_cache_discount_credits",
            "Credits that prompt tokens read from a node's cache took off the charges (their cached_prompt_token_fee "
            "below the prompt_token_fee), by model.",
            ["model"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "llamakit_router_queue_depth",
            "Requests waiting for a node, by model (with --cluster: the whole herd's, the same at every router).",
            ["model"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "llamakit_router_queue_wait_seconds",
            "Time from arrival to a node being assigned, by model.",
            ["model"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.overhead_seconds = Histogram(
            "llamakit_router_overhead_seconds",
            "The router's own time on each paid request (X-Llamakit-Overhead-Ms): its time up to the settlement, "
            "less the queue wait and the node's time, by model.",
            ["model"],
            buckets=OVERHEAD_BUCKETS,
            registry=self.registry,
        )
        self.nodes = Gauge("llamakit_router_nodes", "Nodes by state.", ["state"], registry=self.registry)
        self.checkpoints = Counter(
            "llamakit_router_stream_checkpoints",
            "Checkpoints of running streams sent to the ledger: what each had delivered, which a crash of the router "
            "would charge (--checkpoint-tokens, --checkpoint-ms).",
            registry=self.registry,
        )
        self.affinity = Counter(
            "llamakit_router_affinity_dispatches",
            "Requests whose prefix a node likely held in its prompt cache, by where they went: 'held' to that node, "
            "'moved' to another (it was full, busier than the prefix was worth, or had failed the request).",
            ["outcome"],
            registry=self.registry,
        )

        # Made at the first audit's end, so that no series says anything about the books before one has run.
        self._audit: tuple[Gauge, Gauge, Gauge, Gauge] | None = None
        self.wal_resets = Gauge(
            "llamakit_ledger_wal_resets", "Times the SQLite ledger's WAL was reset since the router started.",
            registry=self.registry,
        )  # fmt: skip
        self.wal_reset_longest = Gauge(
            "llamakit_ledger_wal_reset_seconds_max",
            "The longest WAL reset since the router started: how long holds and settlements waited for it.",
            registry=self.registry,
        )

    def books(self, audit: dict[str, Any], ledger: object) -> None:
        """Gauges read at scrape time: the last audit (`Auditor.view`), and a SQLite ledger's WAL resets."""
        if audit.get("ok") is not None:
            if self._audit is None:
                self._audit = self._audit_gauges()
            ok, discrepancies, checked, seconds = self._audit
            ok.set(1 if audit["ok"] else 0)
            discrepancies.set(audit["count"])
            checked.set(audit["checked"])
            seconds.set(audit["seconds"])
        resets = getattr(ledger, "wal_resets", None)
        if isinstance(resets, int):
            self.wal_resets.set(resets)
            self.wal_reset_longest.set(getattr(ledger, "wal_reset_longest", 0.0))

    def _audit_gauges(self) -> tuple[Gauge, Gauge, Gauge, Gauge]:
        return (
            Gauge(
                "llamakit_ledger_audit_ok",
                "1 when the last audit of the books found the running totals equal to what the history adds up to, "
                "0 when it did not (an alarm: see docs/operating.md#the-audit).",
                registry=self.registry,
            ),
            Gauge("llamakit_ledger_audit_discrepancies", "Running totals the last audit found different from the "
                  "history.", registry=self.registry),
            Gauge("llamakit_ledger_audit_timestamp_seconds", "When the last audit of the books started (epoch "
                  "seconds).", registry=self.registry),
            Gauge("llamakit_ledger_audit_duration_seconds", "How long the last audit of the books took.",
                  registry=self.registry),
        )  # fmt: skip

    def settled(
        self, model: str, node: str, prompt_tokens: int, completion_tokens: int, fee: int, cached_tokens: int = 0,
        cache_discount: int = 0,
    ) -> None:  # fmt: skip
        self._child(self.fees, node).inc(fee)
        if cache_discount:
            self._child(self.cache_discount, model).inc(cache_discount)
        self._child(self.tokens, model, "prompt").inc(prompt_tokens)
        if cached_tokens:
            self._child(self.tokens, model, "prompt_cached").inc(cached_tokens)
        self._child(self.tokens, model, "completion").inc(completion_tokens)

    def dispatched(self, held: bool) -> None:
        """A request with a prefix hint got a node: the one holding the prefix, or another."""
        self._child(self.affinity, "held" if held else "moved").inc()

    def finished(self, model: str, status: str) -> None:
        self._child(self.requests, model, status).inc()

    def refused(self, status: int, code: str) -> None:
        self._child(self.refusals, str(status), code).inc()

    def overhead(self, model: str, seconds: float) -> None:
        """The router spent `seconds` of its own on a request (queue and node excluded)."""
        self._child(self.overhead_seconds, model).observe(seconds)

    def queued(self, model: str, seconds: float) -> None:
        """A request waited `seconds` from its arrival for a node."""
        self._child(self.queue_wait, model).observe(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        """A stream's first token reached its client `seconds` after the request arrived."""
        self._child(self.ttft, model).observe(seconds)

    def observe_request(self, model: str, seconds: float, completion_tokens: int, generating_seconds: float) -> None:
        self._child(self.latency, model).observe(seconds)
        if completion_tokens > 0 and generating_seconds > 0:
            self._child(self.token_rate, model).observe(completion_tokens / generating_seconds)

    def refresh(self, herd: Herd, queue_lengths: dict[str, int]) -> None:
        """Gauges read at scrape time: every node's state and slots, every served model's queue depth (0 too)."""
        names = {node.name for node in herd.nodes.values()}
        for gone in self._node_names - names:  # a removed node's series end with it
            for state in NODE_STATES:
                self.node_state.remove(gone, state)
            for gauge in (self.node_up, self.node_busy, self.node_slots):
                gauge.remove(gone)
            self._children = {k: v for k, v in self._children.items() if gone not in k[1:]}
        self._node_names = names
        for node in herd.nodes.values():
            for state in NODE_STATES:
                self._child(self.node_state, node.name, state).set(1 if node.state == state else 0)
            self._child(self.node_up, node.name).set(1 if node.up else 0)
            self._child(self.node_busy, node.name).set(node.busy)
            self._child(self.node_slots, node.name).set(node.slots)
        states: list[str] = [n.state for n in herd.nodes.values()]
        for name in NODE_STATES:
            self.nodes.labels(name).set(states.count(name))
        for model in {*herd.models(ready_only=False), *queue_lengths}:
            self._child(self.queue_depth, model).set(queue_lengths.get(model, 0))

    def watch_connections(self, guard: ConnectionGuard | None) -> None:
        """Report the client connections of the server this router runs under (`llamakit.server`), once."""
        if guard is not None and not self._watching:
            self.registry.register(ConnectionCollector(guard, "llamakit_router"))
            self._watching = True

    def _child(self, metric: Counter | Gauge | Histogram, *labels: str) -> Any:
        # .labels() builds and hashes a key on every call: a few microseconds per request, cached here.
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)
