"""`create_app(settings)`: the router's aiohttp application, its ledger, its node client and its health checks."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import suppress
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from llamakit.money.fees import FeeSchedule
from llamakit.outage import Outage
from llamakit.router.auth import admin_app, herd_app
from llamakit.router.batches.runner import RUNNER, BatchRunner
from llamakit.router.dispatch.local import LocalDispatcher
from llamakit.router.dispatch.scheduler import Scheduler
from llamakit.router.errors import http_error
from llamakit.router.herd import Herd, HerdNode
from llamakit.router.ledger import LedgerError, UsageRecord, ledger_at
from llamakit.router.ledger._owner import own_ledger
from llamakit.router.ledger_gate import gate_middleware
from llamakit.router.metrics import RouterMetrics
from llamakit.router.openapi import Operation, documented, openapi_routes
from llamakit.router.paid.idempotency import Idempotency
from llamakit.router.paid.record import recovered_record
from llamakit.router.pricing import PriceList
from llamakit.router.routes.admin import admin_routes, herd_routes
from llamakit.router.routes.admin_keys import key_routes
from llamakit.router.routes.admin_pages import page_routes
from llamakit.router.routes.answers import Health, Live, Ready
from llamakit.router.routes.batches import batch_routes
from llamakit.router.routes.embeddings import embedding_routes
from llamakit.router.routes.openai import routes
from llamakit.router.routes.responses import response_routes
from llamakit.router.settings import RouterSettings
from llamakit.router.state import STATE, RouterState, UsageLog
from llamakit.router.upstream import Upstream
from llamakit.server import CONNECTIONS, deadline_middleware
from llamakit.telemetry import Tracing
from llamakit.web import REFUSAL, Handler, error_middleware_for, json_response, request_id_header

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(settings: RouterSettings, *, tracing: Tracing | None = None) -> web.Application:
    """The router's app; `tracing` (default: what the OTEL_* variables ask for, see llamakit.telemetry) gets
    its spans. TracingUnavailable (a ValueError) when those variables ask for traces that cannot be sent."""
    default_fees = FeeSchedule(
        settings.base_fee, settings.prompt_token_fee, settings.completion_token_fee, settings.cached_prompt_token_fee
    )
    prices = PriceList.from_file(settings.fees_file, default_fees) if settings.fees_file else PriceList(default_fees)
    herd = Herd()
    # Opened (and migrated) at start-up, in _books; each usage record keeps the money it is priced at.
    ledger = ledger_at(settings.db, money=settings.money)
    state = RouterState(
        settings=settings,
        ledger=ledger,
        idempotency=Idempotency(ledger),
        prices=prices,
        herd=herd,
        # One router's queue in memory; with --cluster, `_shared_herd` puts the cluster's in its place at start-up.
        dispatch=LocalDispatcher(
            Scheduler(herd, max_queue=settings.max_queue, max_queue_share=settings.max_queue_share)
        ),
        metrics=RouterMetrics(),
        tracing=tracing or Tracing.from_env("llamakit-router"),
    )
    app = web.Application(
        middlewares=[
            _count_refusals,
            error_middleware_for(http_error),
            gate_middleware(state.gate),
            deadline_middleware(settings.request_limits),
        ],
        client_max_size=settings.max_body_bytes,
    )
    app[STATE] = state
    state.metrics.registry.register(state.gate.collector())
    app.add_routes(routes)
    app.add_routes(embedding_routes)
    app.add_routes(response_routes)
    app.add_routes(batch_routes)
    app[RUNNER] = BatchRunner(state)
    # The private parts: each its own sub-application behind the one middleware that checks its credential.
    app.add_subapp("/admin/", admin_app(admin_routes, key_routes, page_routes))
    app.add_subapp("/herd/", herd_app(herd_routes))
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/live", _live)
    app.router.add_get("/metrics", _metrics)
    app.add_routes(openapi_routes())
    app.on_response_prepare.append(request_id_header)
    app.on_startup.append(_watch_connections)
    app.on_shutdown.append(_stopping)
    app.cleanup_ctx.append(_books)
    app.cleanup_ctx.append(_upstream)
    if settings.cluster:
        app.cleanup_ctx.append(_shared_herd)
    app.cleanup_ctx.append(_health_checks)
    app.cleanup_ctx.append(_batches)  # after the cluster's start: a line may go to any router's node
    if state.tracing is not None:
        app.on_cleanup.append(_flush_traces)
    return app


async def _flush_traces(app: web.Application) -> None:
    tracing = app[STATE].tracing
    if tracing is not None:  # the spans still batched go out before the process ends
        await asyncio.to_thread(tracing.shutdown)


@web.middleware
async def _count_refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error response, counted by status and code (`llamakit_router_refusals_total`)."""
    response = await handler(request)
    refusal = response.get(REFUSAL)
    if refusal is not None:
        request.config_dict[STATE].metrics.refused(*refusal)
    return response


async def _watch_connections(app: web.Application) -> None:
    """The client connections of the server this router runs under, in /metrics (under `serve`, not in tests)."""
    app[STATE].metrics.watch_connections(app.get(CONNECTIONS))


async def _stopping(app: web.Application) -> None:
    app[STATE].stopping.set()  # ends the live stats streams, which would otherwise hold up the shutdown


@documented(Operation(summary="Whether the router is up, and its herd", auth=None, answer=Health))
async def _health(request: web.Request) -> web.Response:
    """The router and its herd: 200 `status: ok`, or 503 `status: ledger_unavailable` while the ledger cannot be
    written (so that a balancer probing /health routes around this router meanwhile)."""
    state = request.config_dict[STATE]
    herd = state.herd
    ready = sum(1 for n in herd.nodes.values() if n.state == "ready")
    body = {
        "status": "ok" if state.gate.open else "ledger_unavailable",
        "nodes": len(herd.nodes),
        "ready": ready,
        "models": herd.models(),
        "ledger": state.gate.health(),
    }
    return json_response(body, status=200 if state.gate.open else 503)


@documented(Operation(summary="Readiness: whether this router takes paid requests", auth=None, answer=Ready))
async def _ready(request: web.Request) -> web.Response:
    """Readiness (a Kubernetes readinessProbe, a balancer): 200 when this router takes paid requests, 503 while
    its ledger cannot be written. It comes back by itself; restarting the router does not help."""
    gate = request.config_dict[STATE].gate
    if gate.open:
        return json_response({"ready": True})
    return json_response({"ready": False, "reason": "ledger_unavailable"}, status=503)


@documented(Operation(summary="Liveness: whether the process answers", auth=None, answer=Live))
async def _live(request: web.Request) -> web.Response:
    """Liveness (a Kubernetes livenessProbe): 200 whenever the process answers, whatever its ledger says, so
    that an outage a restart cannot mend does not turn into restarts."""
    return json_response({"live": True})


@documented(Operation(summary="Prometheus metrics", auth=None, text="text/plain"))
async def _metrics(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    # The herd's queue (every router's requests with --cluster; the other series are this router's).
    state.metrics.refresh(state.herd, await state.dispatch.queue_depths())
    state.metrics.books(state.auditor.view(), state.ledger)
    return web.Response(body=state.metrics.render(), content_type="text/plain", charset="utf-8")


def _stop_router() -> None:
    """Stop this router as SIGTERM does: drain, settle what runs, close (see PostgresOwner)."""
    signal.raise_signal(signal.SIGTERM)


async def _books(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    # The log is opened first: a hold released here is never found again, so its line must be written now.
    if state.settings.cluster:
        state.ledger.router_id = state.settings.cluster_id
    release = await own_ledger(state.settings.db, cluster=bool(state.settings.cluster), on_lost=_stop_router)
    try:
        await state.ledger.open()
    except BaseException:
        await release()
        raise
    if state.settings.usage_log is not None:
        state.usage_log = UsageLog(state.settings.usage_log)
    # In a cluster the other routers' holds are theirs: only those of routers without a lease are released,
    # once this router holds its own (see _shared_herd).
    released = [] if state.settings.cluster else await state.ledger.recover_usage()
    if released:
        log.warning(
            "released %d hold(s) left open by a previous run that did not finish: %d credits charged for what "
            "their streams had delivered by their last checkpoint, the rest refunded",
            len(released),
            sum(record.cost for record in released),
        )
    await _recovered(state, released)
    state.auditor.start()  # the books proved by a full scan, in the background: now, then every --audit-every
    async with state.gate.watching(state.ledger):
        yield
    await state.auditor.stop()
    if state.usage_log is not None:
        state.usage_log.close()
    await state.ledger.close()
    await release()


async def _recovered(state: RouterState, released: list[UsageRecord]) -> None:
    """The usage log's lines of the holds released at start-up, with the fields of every other line."""
    if state.usage_log is None:
        return
    for record in released:
        account = (await state.ledger.get_account(record.account_id)).name
        state.usage_log.write(recovered_record(state.settings.money, record, account))


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector) as session:
        state.upstream = Upstream(session, state.settings.herd_token, node_timeout=state.settings.node_timeout)
        for url in state.settings.nodes:
            host = urlsplit(url).netloc or url
            node = state.herd.join(url=url, name=host, models=[], slots=1, static=True)
            node.up = False  # until its first health check answers
        yield


async def _shared_herd(app: web.Application) -> AsyncIterator[None]:
    """--cluster: take a lease, share the herd and the queue with the other routers on the database."""
    from llamakit.router.dispatch.cluster import Cluster, ClusterIdempotency  # asyncpg only where it is used
    from llamakit.router.ledger._postgres import PostgresLedger

    state = app[STATE]
    settings = state.settings
    assert isinstance(state.ledger, PostgresLedger)
    cluster = Cluster(
        settings.db,
        router_id=settings.cluster_id,
        url=f"http://{settings.reachable_host}:{settings.port}",
        herd=state.herd,
        ledger=state.ledger,
        lease=settings.lease,
        max_queue=settings.max_queue,
        max_queue_share=settings.max_queue_share,
    )
    statics = list(state.herd.nodes.values())
    await cluster.open()
    try:
        released = await state.ledger.release_lost(
            me=cluster.id, error="the router that held this request stopped before it finished"
        )
        if released:
            log.warning(
                "released %d hold(s) left open by routers that stopped: %d credits charged for what their streams "
                "had delivered by their last checkpoint, the rest refunded",
                len(released),
                sum(record.cost for record in released),
            )
        await _recovered(state, released)
        for node in statics:
            await cluster.joined(node, static=True)
        await cluster.reload()
        local = (state.dispatch, state.idempotency)
        state.dispatch, state.idempotency = cluster, ClusterIdempotency(state.ledger, cluster)
        cluster.start()
        yield
    finally:
        if "local" in locals():  # put back for the requests that still finish while the app stops
            state.dispatch, state.idempotency = local
        await cluster.close()


async def _batches(app: web.Application) -> AsyncIterator[None]:
    """Run the lines of the batches in progress (llamakit.router.batches.runner)."""
    runner = app[RUNNER]
    runner.start()
    yield
    await runner.stop()


async def _check(state: RouterState, node: HerdNode) -> None:
    assert state.upstream is not None
    try:
        health = await state.upstream.health(node.url, within=max(2.0, 2 * state.settings.health_interval))
    except TimeoutError:
        # A node busy generating on every core may answer its health check late. With requests in flight
        # it is not counted as failed: those requests' own --node-timeout catches a node that really hangs.
        if node.busy == 0:
            state.herd.failed(node)
        return
    except (aiohttp.ClientError, ValueError):
        state.herd.failed(node)
        return
    if health.get("status") != "ready":
        node.up = False  # loading another model, or broken: no work until it says ready
        return
    if node.static and isinstance(health.get("name"), str) and health["name"]:
        node.name = health["name"]  # a static node is known by its URL until it tells its name
    models = health.get("models")
    slots = health.get("slots")
    n_ctx = health.get("n_ctx")
    came_back = state.herd.seen(
        node,
        models=models if isinstance(models, list) else None,
        slots=slots if isinstance(slots, int) and slots > 0 else None,
        n_ctx=n_ctx if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > 0 else None,
    )
    if came_back:
        log.info("node %s is up, serving %s with %d slot(s)", node.name, node.models, node.slots)
        state.dispatch.pump()


def _database_failure(exc: BaseException) -> bool:
    """Whether `exc` is the database's (or the network's) failure rather than a bug: asyncpg's own errors too,
    without importing asyncpg where it is not installed."""
    return isinstance(exc, (LedgerError, OSError, TimeoutError)) or type(exc).__module__.startswith("asyncpg")


async def _health_checks(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    writes = Outage(log, "writing the herd's health to the database", cost="rounds failed")

    async def loop() -> None:
        while True:
            # In a cluster one router checks the herd for all (the leader) and writes what it finds.
            dispatch = state.dispatch
            if dispatch.leader:
                nodes = list(state.herd.nodes.values())
                before = {n.id: n.up for n in nodes}
                await asyncio.gather(*(_check(state, n) for n in nodes), return_exceptions=True)
                try:
                    await dispatch.checked(before)
                    writes.ended()
                except Exception as exc:
                    writes.failed(exc, traceback=None if _database_failure(exc) else exc)
                    writes.count()
            await asyncio.sleep(state.settings.health_interval)

    task = asyncio.create_task(loop(), name="health checks")
    yield
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
