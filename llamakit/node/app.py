"""`create_app(settings)`: the node's aiohttp application, its model lifecycle and its herd-token check."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import suppress

from aiohttp import web

from llamakit.catalog import ResolvedModel
from llamakit.node.batched import BatchedModel
from llamakit.node.embeddings import setup_embeddings
from llamakit.node.engine import LoadedModel, SimpleModel
from llamakit.node.host import ModelHost
from llamakit.node.llama_log import route_llama_log
from llamakit.node.loop_inbox import LoopInbox
from llamakit.node.membership import keep_membership
from llamakit.node.metrics import NodeMetrics, count_connections
from llamakit.node.model_file import watch_model_file
from llamakit.node.placement import LlamaOptions
from llamakit.node.routes import HOST, INBOX, METRICS, RUNS, SETTINGS, http_error, routes
from llamakit.node.settings import NodeSettings
from llamakit.node.tracing import setup_tracing
from llamakit.server import deadline_middleware
from llamakit.telemetry import Tracing
from llamakit.web import Handler, error_middleware_for, require_bearer

__all__ = ["create_app"]

# Everything else is the router's business only: the AO worker takes work from its router alone.
PUBLIC_PATHS = frozenset({"/health", "/metrics"})


def create_app(settings: NodeSettings, *, tracing: Tracing | None = None) -> web.Application:
    """The node's app; `tracing` (default: what the OTEL_* variables ask for, see llamakit.telemetry) gets its
    spans. TracingUnavailable (a ValueError) when those variables ask for traces that cannot be sent."""

    @web.middleware
    async def herd_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            require_bearer(request, settings.herd_token, what="herd token")
        return await handler(request)

    app = web.Application(
        middlewares=[error_middleware_for(http_error), deadline_middleware(settings.request_limits), herd_auth],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings

    def load(resolved: ResolvedModel) -> LoadedModel:
        options = LlamaOptions.from_settings(settings)
        if settings.engine == "batched":
            return BatchedModel(
                resolved,
                slots=settings.slots,
                n_ctx=settings.n_ctx,
                threads=settings.threads,
                prefill_chunk=settings.prefill_chunk,
                cache_ram=settings.cache_ram * 1024 * 1024,
                options=options,
            )
        return SimpleModel(
            resolved, slots=settings.slots, n_ctx=settings.n_ctx, threads=settings.threads, options=options
        )

    host = ModelHost(load, slots=settings.slots)
    app[HOST] = host
    app[RUNS] = {}
    app[METRICS] = NodeMetrics(lambda: host.busy)
    app.add_routes(routes)
    setup_embeddings(app)

    route_llama_log(getattr(logging, settings.llama_log.upper()))

    async def model_lifecycle(app: web.Application) -> AsyncIterator[None]:
        app[INBOX] = LoopInbox(asyncio.get_running_loop())
        # The server answers /health ("loading") while the model loads in the background.
        host.start_loading(settings.model)
        membership = asyncio.create_task(keep_membership(settings, host)) if settings.router else None
        watch = asyncio.create_task(watch_model_file(host), name="model file")
        yield
        for task in (membership, watch):
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        await host.close()

    app.on_startup.append(count_connections(METRICS))
    app.cleanup_ctx.append(model_lifecycle)
    setup_tracing(app, tracing)
    return app
