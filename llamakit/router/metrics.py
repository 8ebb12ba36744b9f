"""The router's Prometheus metrics, in a registry of its own (one per app)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["RouterMetrics"]


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[object, ...], Any] = {}
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
        self.queue_depth = Gauge(
            "llamakit_router_queue_depth", "Requests waiting for a node, by model.", ["model"], registry=self.registry
        )
        self.queue_wait = Histogram(
            "llamakit_router_queue_wait_seconds",
            "Time from arrival to a node being assigned.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.nodes = Gauge("llamakit_router_nodes", "Nodes by state.", ["state"], registry=self.registry)
        self.affinity = Counter(
            "llamakit_router_affinity_dispatches",
            "Requests whose prefix a node likely held in its prompt cache, by where they went: 'held' to that node, "
            "'moved' to another (it was full, busier than the prefix was worth, or had failed the request).",
            ["outcome"],
            registry=self.registry,
        )

    def settled(
        self, model: str, node: str, prompt_tokens: int, completion_tokens: int, fee: int, cached_tokens: int = 0
    ) -> None:
        self._child(self.fees, node).inc(fee)
        self._child(self.tokens, model, "prompt").inc(prompt_tokens)
        if cached_tokens:
            self._child(self.tokens, model, "prompt_cached").inc(cached_tokens)
        self._child(self.tokens, model, "completion").inc(completion_tokens)

    def dispatched(self, held: bool) -> None:
        """A request with a prefix hint got a node: the one holding the prefix, or another."""
        self._child(self.affinity, "held" if held else "moved").inc()

    def finished(self, model: str, status: str) -> None:
        self._child(self.requests, model, status).inc()

    def _child(self, metric: Counter, *labels: str) -> Any:
        # .labels() builds and hashes a key on every call: a few microseconds per request, cached here.
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)
