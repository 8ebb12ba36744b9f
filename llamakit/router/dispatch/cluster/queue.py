"""The herd's queue in the database: requests enqueued and dispatched by PL/pgSQL under one advisory lock, their
assignments delivered by NOTIFY (and a safety-net round every second), their slots given back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

import asyncpg

from llamakit.router.affinity import CHARS_PER_EXTRA_REQUEST, Affinity
from llamakit.router.dispatch import BATCH_BID, HerdView
from llamakit.router.dispatch.cluster._base import (
    _DB_ERRORS,
    _DB_NOW,
    ClusterBase,
    _Waiter,
)
from llamakit.router.dispatch.errors import (
    DispatchError,
    LeaseLost,
    NoNode,
    no_node_now,
    queue_full,
    queue_share_exceeded,
    queue_timeout,
)
from llamakit.router.herd import HerdNode
from llamakit.router.ledger._postgres import _database_error

__all__ = ["SharedQueue"]


class SharedQueue(ClusterBase):
    def take_now(
        self, request_id: str, model: str, bid: Decimal, *, exclude: frozenset[str], prefer: Affinity | None
    ) -> None:
        """Raise NoNode when no node that is up and not draining could ever serve the request (as `Scheduler`);
        else None: a slot of the herd's is given only by the database's dispatch (`acquire`)."""
        nodes = self.herd.nodes.values()
        if not any(n.up and not n.draining and n.id not in exclude and n.serves(model) for n in nodes):
            raise no_node_now(model)

    async def acquire(
        self,
        request_id: str,
        model: str,
        bid: Decimal,
        *,
        max_wait: float,
        exclude: frozenset[str],
        arrived: float,
        prefer: Affinity | None,
        account: int | None,
    ) -> HerdNode:
        """A node with a slot reserved for request `request_id` in the whole herd; give it back with `free`.

        `arrived` is `time.monotonic()` at the router; it is stored as epoch seconds so that routers compare
        arrivals. Raises 503 when no node can serve the model, 429 when the model's queue (herd-wide) is full or
        `account` holds its share of it, 504 after `max_wait` seconds.
        """
        self.take_now(request_id, model, bid, exclude=exclude, prefer=prefer)
        pending = self._freeing.get(request_id)
        if pending is not None:  # the row of its last attempt must be gone before it queues again
            await asyncio.shield(pending)
        waiter = _Waiter(model, exclude, batch=bid == BATCH_BID)
        self._waiting[request_id] = waiter
        try:
            started = time.perf_counter()
            try:
                rows = await self._db().fetch(
                    "SELECT * FROM llamakit_enqueue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                    self._lock_key, self._channel, self.id, CHARS_PER_EXTRA_REQUEST, request_id, model, bid,
                    account, time.time() - (time.monotonic() - arrived), sorted(exclude),
                    prefer.node_id if prefer else None, prefer.chars if prefer else 0, self.max_queue,
                    self.max_per_account,
                )  # fmt: skip
            except asyncpg.PostgresError as exc:
                if getattr(exc, "sqlstate", None) == "LK429":
                    raise self._refusal(model, str(getattr(exc, "message", exc))) from None
                raise _database_error(exc) from exc  # 503 ledger_unavailable when the database is away
            except _DB_ERRORS as exc:
                raise _database_error(exc) from exc
            waiter.queued = True
            self._delivered(rows, started)
            # Given a node by its own dispatch, or later by a NOTIFY (or the sync round's look at the queue).
            try:
                node_id = await asyncio.wait_for(asyncio.shield(waiter.future), max_wait)
            except TimeoutError:
                raise queue_timeout(model, max_wait) from None
        except BaseException:
            self._waiting.pop(request_id, None)
            # Whether it still waited or was given a node meanwhile, its row goes and any slot it got is freed.
            self._freeing[request_id] = self._spawn(self._give_back(request_id))
            raise
        self._waiting.pop(request_id, None)
        try:
            node = await self._node(node_id)
        except BaseException:
            self._freeing[request_id] = self._spawn(self._give_back(request_id))
            raise
        node.busy += 1
        return node

    def _refusal(self, model: str, reason: str) -> DispatchError:
        """The refusal for `reason` from llamakit_enqueue: 'queue_full <waiting>' or 'queue_share <mine>'."""
        what, _, count = reason.partition(" ")
        if what == "queue_full":
            return queue_full(model, self.max_queue)
        return queue_share_exceeded(model, count, self.max_per_account, self.max_queue)

    async def _node(self, node_id: str) -> HerdNode:
        node = self.herd.nodes.get(node_id)
        if node is None:  # joined at another router a moment ago
            await self.reload()
            node = self.herd.nodes.get(node_id)
        if node is None:
            raise NoNode(f"node {node_id!r} left the herd", model="")
        return node

    def free(self, request_id: str, node: HerdNode) -> None:
        """The request is done with its node: its row goes, and the slot goes to the best waiting request."""
        node.busy -= 1
        self._freeing[request_id] = self._spawn(self._give_back(request_id))

    async def _give_back(self, request_id: str) -> None:
        started = time.perf_counter()
        try:
            # llamakit_finish frees the queue row once: a second run finds none and does nothing.
            rows = await self._until_done(
                f"giving back the slot of {request_id}",
                lambda: self._db().fetch(
                    "SELECT * FROM llamakit_finish($1, $2, $3, $4, $5)",
                    self._lock_key, self._channel, self.id, CHARS_PER_EXTRA_REQUEST, request_id,
                ),
            )  # fmt: skip
            self._delivered(rows, started)
        finally:
            self._freeing.pop(request_id, None)

    async def dispatch(self, models: Iterable[str] | None = None) -> None:
        """Give free slots to the best waiting requests of `models` (None: every model that has some)."""
        await self._dispatch(self._db(), None if models is None else list(models))

    async def _dispatch(self, conn: asyncpg.Connection | asyncpg.Pool, models: list[str] | None) -> None:
        """Run llamakit_dispatch (in `conn`'s transaction, if it has one) and deliver this router's share."""
        started = time.perf_counter()
        rows = await conn.fetch(
            "SELECT * FROM llamakit_dispatch($1, $2, $3, $4, $5)",
            self._lock_key, models, self._channel, self.id, CHARS_PER_EXTRA_REQUEST,
        )  # fmt: skip
        self._delivered(rows, started)

    def _delivered(self, rows: Sequence[asyncpg.Record], started: float) -> None:
        """Assignments a dispatch made: this router's requests get their nodes at once (the others' routers
        were told by NOTIFY)."""
        for row in rows:
            if row["assigned_router"] == self.id:
                self._deliver(row["assigned_request"], row["assigned_node"])
        bids = [row["assigned_bid"] for row in rows if row["assigned_bid"] != BATCH_BID]
        if bids:
            self.last_multiplier = bids[-1]
        self.figures.dispatches += 1
        self.figures.assigned += len(rows)
        self.figures.seconds += time.perf_counter() - started

    def _deliver(self, request_id: str, node_id: str) -> None:
        waiter = self._waiting.get(request_id)
        if waiter is not None and not waiter.future.done():
            waiter.future.set_result(node_id)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload == "herd":
            self._reload_due.set()
            return
        router_id, request_id, node_id = payload.split(" ", 2)
        if router_id == self.id:
            self._deliver(request_id, node_id)

    async def _sync(self) -> None:
        """The safety net: reload the herd, lead the health checks if nobody does, dispatch, and pick up
        assignments whose NOTIFY was missed (a listener connection that dropped, for one)."""
        await self.try_lead()
        await self.reload()
        for waiter in list(self._waiting.values()):
            if not waiter.future.done() and not any(
                n.up and not n.draining and n.id not in waiter.exclude for n in self.herd.serving(waiter.model)
            ):
                waiter.future.set_exception(
                    NoNode(f"no node is available for model {waiter.model!r}", model=waiter.model)
                )
        await self.dispatch()
        await self._look_at_waiters()

    async def _look_at_waiters(self) -> None:
        """Deliver the assignments of this router's waiting requests whose NOTIFY was missed, and fail those
        whose queue rows are gone: another router took this one's lease for run out (a pause longer than
        --lease) and dropped them, and released their holds; they would wait for nothing until the queue
        timeout."""
        queued = [rid for rid, waiter in self._waiting.items() if waiter.queued and not waiter.future.done()]
        if not queued:
            return
        rows = await self._db().fetch(
            "SELECT request_id, node_id FROM queue WHERE request_id = ANY($1::text[])", queued
        )
        found = {row["request_id"]: row["node_id"] for row in rows}
        for request_id in queued:
            waiter = self._waiting.get(request_id)
            if waiter is None or waiter.future.done():
                continue
            if request_id not in found:
                waiter.future.set_exception(
                    LeaseLost(
                        "this router lost its place in the herd's queue (its lease ran out while it was paused) and "
                        "the request's hold was released: nothing was charged; send it again",
                        model=waiter.model,
                    )
                )
            elif found[request_id] is not None:
                self._deliver(request_id, found[request_id])

    def queue_length(self, model: str) -> int:
        """This router's interactive requests waiting for `model` (the herd's: `queue_depths`)."""
        return sum(1 for w in self._waiting.values() if w.model == model and not w.batch and not w.future.done())

    async def queue_depths(self) -> dict[str, int]:
        """Requests waiting for a node, per model, herd-wide (every router's); batch lines are not counted."""
        rows = await self._db().fetch(
            "SELECT model, count(*) AS n FROM queue WHERE node_id IS NULL AND bid <> $1 GROUP BY model", BATCH_BID
        )
        return {r["model"]: r["n"] for r in rows}

    async def herd_view(self, models: list[str]) -> HerdView:
        """The herd's queue and busy slots from the database; this router's id, whether it leads, the routers
        with their leases, and what its dispatches cost (see stats.snapshot for which figures are whose)."""
        shared = await self.herd_figures()
        depths = shared["queues"]
        queue = {
            m: {"depth": depths.get(m, {}).get("depth", 0), "oldest_wait": depths.get(m, {}).get("oldest_wait", 0.0)}
            for m in sorted(set(models) | set(depths))
        }
        figures = self.figures
        cluster = {
            "router": self.id,
            "leader": self.leader,
            "routers": shared["routers"],
            "dispatch": {
                "count": figures.dispatches,
                "assigned": figures.assigned,
                "mean_ms": round(1000 * figures.seconds / figures.dispatches, 3) if figures.dispatches else None,
            },
        }
        return HerdView(queue=queue, last_multiplier=self.last_multiplier, busy=shared["busy"], cluster=cluster)

    async def herd_figures(self) -> dict[str, Any]:
        """Herd-wide figures from the database: queue depth and oldest wait per model (seconds), running
        requests per node, and the routers with their leases (seconds left)."""
        pool = self._db()
        queues = await pool.fetch(
            f"SELECT model, count(*) FILTER (WHERE node_id IS NULL AND bid <> $1) AS depth, "
            f"COALESCE(max({_DB_NOW} - enqueued) FILTER (WHERE node_id IS NULL AND bid <> $1), 0) AS oldest, "
            "count(*) FILTER (WHERE node_id IS NOT NULL) AS running FROM queue GROUP BY model",
            BATCH_BID,
        )
        nodes = await pool.fetch("SELECT id, running FROM nodes")
        routers = await pool.fetch(f"SELECT id, url, lease_until - {_DB_NOW} AS lease_left FROM routers ORDER BY id")
        return {
            "queues": {
                r["model"]: {"depth": r["depth"], "oldest_wait": round(r["oldest"], 3), "running": r["running"]}
                for r in queues
            },
            "busy": {r["id"]: r["running"] for r in nodes},
            "routers": [{"id": r["id"], "url": r["url"], "lease_left": round(r["lease_left"], 3)} for r in routers],
        }
