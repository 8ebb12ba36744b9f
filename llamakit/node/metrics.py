"""The node's Prometheus metrics, in a registry of its own (one per app, so tests and apps never share state)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llamakit.server import CONNECTIONS, ConnectionCollector

__all__ = ["NodeMetrics", "count_connections"]


class NodeMetrics:
    def __init__(self, busy_slots: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llamakit_node_requests",
            "Requests by route and outcome (ok, cancelled, rejected, busy, error).",
            ["route", "outcome"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter("llamakit_node_prompt_tokens", "Prompt tokens served.", registry=self.registry)
        self.cached_tokens = Counter(
            "llamakit_node_prompt_tokens_cached",
            "Prompt tokens found in a slot's prompt cache, not decoded again (counted in prompt tokens too).",
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "llamakit_node_completion_tokens", "Completion tokens generated.", registry=self.registry
        )
        self.generation_seconds = Counter(
            "llamakit_node_generation_seconds",
            "Seconds spent generating; completion tokens over this is the node's tokens per second.",
            registry=self.registry,
        )
        self.tokens_per_second = Histogram(
            "llamakit_node_generation_tokens_per_second",
            "Tokens per second of each finished generation (prompt evaluation included).",
            buckets=(5, 10, 20, 40, 60, 80, 100, 150, 200, 400),
            registry=self.registry,
        )
        busy = Gauge("llamakit_node_busy_slots", "Slots generating now.", registry=self.registry)
        busy.set_function(lambda: float(busy_slots()))

    def observe_generation(
        self, prompt_tokens: int, completion_tokens: int, seconds: float, cached_tokens: int = 0
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.completion_tokens.inc(completion_tokens)
        self.generation_seconds.inc(seconds)
        if seconds > 0 and completion_tokens:
            self.tokens_per_second.observe(completion_tokens / seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def count_connections(metrics: web.AppKey[NodeMetrics]) -> Callable[[web.Application], Awaitable[None]]:
    """An on_startup hook that puts the open connections `serve` counts on a node's /metrics (either kind of
    node: `metrics` is its app's key); nothing under a test server, which has no such count."""

    async def watch_connections(app: web.Application) -> None:
        guard = app.get(CONNECTIONS)
        if guard is not None:
            app[metrics].registry.register(ConnectionCollector(guard, "llamakit_node"))

    return watch_connections
