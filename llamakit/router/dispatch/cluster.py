"""Several routers on one PostgreSQL database (`--cluster`): one queue and one set of slots for the herd, one
herd membership, idempotency claims every router sees, and leases that let the living clean up after the dead.

The database is the one place all routers agree on, so everything they must agree on lives there (migration
0004): `routers` (leases), `nodes` (membership, draining, up/down, `running` requests), `queue` (every request
waiting for or running on a node, whichever router holds its client) and `idempotency_claims`.

Dispatch is one transaction under one advisory lock per database schema (`pg_advisory_xact_lock`): it takes
the best waiting rows of a model (bid DESC, turn, arrived, seq: the in-process `Scheduler`'s order, with its
fair-share turns, `exclude` and affinity `prefer`) and gives them the least-loaded nodes with a free slot.
One lock for the herd rather than one per model: a node may serve several models, and its slots are shared
by all of them. Dispatch runs when a request arrives (its row is inserted in the same transaction, and an
assignment of its own is returned at once), when one finishes (its row deleted in the same transaction),
when a node joins or comes back, and every second as a safety net. A router learns that another router's
dispatch gave its request a node by `NOTIFY` on one channel per schema (payload `router request node`).

Time in the database (leases, rests) is the database's clock, so routers on hosts whose clocks differ agree.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg

from llamakit.router.affinity import CHARS_PER_EXTRA_REQUEST, Affinity
from llamakit.router.dispatch import HerdView
from llamakit.router.dispatch.errors import (
    DispatchError,
    LeaseLost,
    NoNode,
    no_node_now,
    queue_full,
    queue_share_exceeded,
    queue_timeout,
)
from llamakit.router.herd import Herd, HerdNode
from llamakit.router.ledger import Ledger, LedgerError, Remembered
from llamakit.router.paid.idempotency import Claim, Idempotency, KeyInUse

__all__ = ["Cluster", "ClusterIdempotency", "Figures", "RouterIdInUse"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Seconds between the safety-net rounds: reload the herd, dispatch, look for assignments a NOTIFY missed.
SYNC_SECONDS: Final = 1.0
# Seconds between looks at the claim of an idempotency key that another router is running.
CLAIM_POLL_SECONDS: Final = 0.05
# How long a repeat waits for the first request under its idempotency key (a long generation takes minutes).
CLAIM_WAIT_SECONDS: Final = 600.0
_FAST_COMMITS: Final = {"synchronous_commit": "off"}  # unless the --db URL sets it, as for the ledger
_DB_NOW: Final = "extract(epoch FROM clock_timestamp())::float8"


class RouterIdInUse(LedgerError):
    """A live router already runs with this router's id on the database."""


@dataclass
class Figures:
    """What this router's dispatches cost: how many and how long (seconds of wall time, lock wait included)."""

    dispatches: int = 0
    seconds: float = 0.0
    assigned: int = 0


@dataclass
class _Waiter:
    model: str
    exclude: frozenset[str]
    future: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    queued: bool = False  # its row is in the queue (the enqueue statement returned)


class Cluster:
    """This router's part in a cluster of routers sharing the PostgreSQL database at `dsn`.

    `herd` is kept in step with the `nodes` table (on NOTIFY and every second); `ledger` is the router's
    PostgreSQL ledger, whose holds carry `router_id`. Open with `await open()`, then `start()` the background
    tasks; `close()` stops them, deletes this router's queue rows and claims, and ends its lease.
    """

    def __init__(
        self,
        dsn: str,
        *,
        router_id: str,
        url: str,
        herd: Herd,
        ledger: Ledger,
        lease: float,
        max_queue: int,
        max_queue_share: float,
    ) -> None:
        self.id = router_id
        self.url = url
        self.herd = herd
        self.ledger = ledger
        self.lease = lease
        self.max_queue = max_queue
        self.max_per_account = max(1, int(max_queue * max_queue_share))
        self.leader = False  # whether this router runs the herd's health checks
        self.last_multiplier = Decimal(1)
        self.figures = Figures()
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._channel = ""
        self._lock_key = 0
        self._leader_key = 0
        self._id_key = 0
        self._waiting: dict[str, _Waiter] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._releasing: dict[str, asyncio.Task[None]] = {}
        self._reload_due = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._lease_lost = False
        self._renewed = False

    # -- lifecycle -------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, take this router's lease, and forget what an earlier life of this router left in the queue.

        The ledger must be open (its migrations made the tables). Raises asyncpg/OSError errors when the
        database cannot be reached.
        """
        # No reset query when a connection goes back to the pool (a round trip per call): nothing here leaves
        # session state on a pooled connection (the LISTEN and the leader's lock live on `_listener`). And no
        # wait for the WAL to reach the disk at each commit: the dispatch lock is let go only at commit, so a
        # flush per statement (milliseconds) would be the whole herd's pace. A database crash may lose the
        # last queue changes, which die with the routers' connections anyway; the books are the ledger's.
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=1,
            max_size=8,
            reset=_no_reset,
            server_settings={} if "synchronous_commit" in parse_qs(urlsplit(self._dsn).query) else _FAST_COMMITS,
        )
        where = await self._pool.fetchval("SELECT current_database() || '.' || current_schema()")
        digest = hashlib.sha256(str(where).encode()).digest()
        # NOTIFY channels and advisory locks are per database, not per schema: name them after both.
        self._channel = "llamakit_" + digest[:8].hex()
        self._lock_key = int.from_bytes(digest[8:16], "big", signed=True)
        self._leader_key = int.from_bytes(digest[16:24], "big", signed=True)
        self._id_key = int.from_bytes(hashlib.sha256(f"{where}\0router\0{self.id}".encode()).digest()[:8], "big",
                                      signed=True)  # fmt: skip
        try:
            await self._listen()
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self._lock_key)
            await self._forget_routers(conn, [self.id])
            await conn.execute(
                f"INSERT INTO routers (id, url, started, lease_until) VALUES ($1, $2, {_DB_NOW}, {_DB_NOW} + $3) "
                f"ON CONFLICT (id) DO UPDATE SET url = $2, started = {_DB_NOW}, lease_until = {_DB_NOW} + $3",
                self.id,
                self.url,
                self.lease,
            )
        await self.reload()

    async def _listen(self) -> None:
        """(Re)open the connection that LISTENs and holds the leader's lock; a lost one lost both."""
        if self._listener is not None:
            with suppress(*_DB_ERRORS):
                await self._listener.close()
        self.leader = False
        self._listener = listener = await asyncpg.connect(self._dsn)
        # The router id's lock, held while this router lives: a second router given the same id would take
        # the first one's queue rows and holds for an earlier life's (see `open`) and wreck its requests. A
        # router that died lets go of it when the database sees its connection close.
        if not await listener.fetchval("SELECT pg_try_advisory_lock($1)", self._id_key):
            self._listener = None
            await listener.close()
            raise RouterIdInUse(
                f"another router is running with the router id {self.id!r} on this database; give each router "
                "its own --router-id (a router that was killed frees its id as soon as the database sees its "
                "connection close)"
            )
        await listener.add_listener(self._channel, self._notified)
        self._reload_due.set()  # what was announced while nobody listened

    def start(self) -> None:
        """Start the lease, janitor, herd-sync and leader tasks."""
        self._tasks = [
            asyncio.create_task(self._every(self.lease / 3, self._renew), name="cluster lease"),
            asyncio.create_task(self._every(SYNC_SECONDS, self._sync), name="cluster sync"),
            asyncio.create_task(self._reloader(), name="cluster herd reload"),
        ]

    async def close(self) -> None:
        """Stop, hand this router's queue rows and claims back, and give up the lease (idempotent)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._pool is not None:
            with suppress(*_DB_ERRORS):
                async with self._pool.acquire() as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", self._lock_key)
                    await self._forget_routers(conn, [self.id])
                    await conn.execute("DELETE FROM routers WHERE id = $1", self.id)
                    await self._dispatch(conn, None)
            await self._pool.close()
            self._pool = None
        if self._listener is not None:
            with suppress(*_DB_ERRORS):
                await self._listener.close()
            self._listener = None

    def _db(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the cluster is not open")
        return self._pool

    async def _every(self, seconds: float, work: Any) -> None:
        while True:
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database blip must not end the loop: the next round tries again
                log.exception("cluster: %s failed", getattr(work, "__name__", work))
            await asyncio.sleep(seconds)

    async def _until_done(self, what: str, work: Callable[[], Awaitable[_T]]) -> _T:
        """`work()`'s result, asked for again (0.1 s, doubling to 5 s) while the database cannot be reached: a
        slot, a queue row or an idempotency claim given back only once would be lost to a database restart,
        taken until this router stops (its lease is alive, so no other router cleans up after it). `work`
        must be safe to run twice: the first run may have committed before its answer was lost."""
        pause = 0.1
        while True:
            try:
                return await work()
            except _DB_ERRORS as exc:
                log.warning("cluster: %s failed (%s); trying again in %.1f s", what, exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)

    def _spawn(self, work: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)
        return task

    # -- leases ----------------------------------------------------------------------------------------

    async def _renew(self) -> None:
        """Renew this router's lease, then clean up after every router whose lease ran out."""
        inserted = await self._db().fetchval(
            f"INSERT INTO routers (id, url, started, lease_until) VALUES ($1, $2, {_DB_NOW}, {_DB_NOW} + $3) "
            f"ON CONFLICT (id) DO UPDATE SET lease_until = {_DB_NOW} + $3 RETURNING xmax = 0",
            self.id,
            self.url,
            self.lease,
        )
        if inserted and not self._lease_lost and self._renewed:
            # Another router found this one's lease run out (a pause longer than the lease): it released this
            # router's holds and queue rows. Requests in flight here will find their holds closed.
            self._lease_lost = True
            log.error(
                "this router's lease ran out and was taken over (was it paused longer than --lease?): its requests "
                "in flight were refunded by another router and are answered free of charge; its queued requests "
                "get 503 router_lease_lost"
            )
            await self._look_at_waiters()
        self._renewed = True
        await self.reap()
        # Every round, not only after a reap: a router that reaped and died before it released is covered.
        await self.release_lost_holds()

    async def reap(self) -> list[str]:
        """Clean up after the routers whose lease has run out: free their slots, drop their queue rows and
        idempotency claims, then dispatch. Returns their ids. (Their holds: `release_lost_holds`.)"""
        async with self._db().acquire() as conn, conn.transaction():
            dead = [
                r["id"] for r in await conn.fetch(f"DELETE FROM routers WHERE lease_until < {_DB_NOW} RETURNING id")
            ]
            if not dead:
                return []
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self._lock_key)
            await self._forget_routers(conn, dead)
            await self._dispatch(conn, None)
        log.warning("router(s) %s lost their lease: their queue rows and claims were dropped", ", ".join(dead))
        return dead

    async def release_lost_holds(self, *, earlier_life: bool = False) -> int:
        """Release the open holds of routers without a live lease (and this router's own from an earlier life
        when `earlier_life`); returns how many."""
        from llamakit.router.ledger._postgres import PostgresLedger

        assert isinstance(self.ledger, PostgresLedger)
        released = await self.ledger.release_lost(
            me=self.id if earlier_life else "",
            error="the router that held this request stopped before it finished; refunded in full",
        )
        if released:
            routers = await self._db().fetch(
                "SELECT DISTINCT coalesce(router_id, '(no router)') AS id FROM holds WHERE id = ANY($1::text[]) "
                "ORDER BY 1",
                [record.request_id for record in released],
            )
            log.warning(
                "released %d hold(s) of router(s) %s, which stopped or lost their lease: refunded in full",
                len(released),
                ", ".join(r["id"] for r in routers),
            )
        return len(released)

    async def _forget_routers(self, conn: asyncpg.Connection, routers: Sequence[str]) -> None:
        """Drop the queue rows and claims of `routers`, giving back the slots their running rows held (under
        the dispatch lock)."""
        await conn.execute(
            "WITH gone AS (DELETE FROM queue WHERE router_id = ANY($1::text[]) RETURNING node_id) "
            "UPDATE nodes SET running = GREATEST(nodes.running - c.k, 0) FROM "
            "(SELECT node_id, count(*)::int AS k FROM gone WHERE node_id IS NOT NULL GROUP BY node_id) c "
            "WHERE nodes.id = c.node_id",
            list(routers),
        )
        await conn.execute("DELETE FROM idempotency_claims WHERE router_id = ANY($1::text[])", list(routers))

    # -- membership ------------------------------------------------------------------------------------

    async def reload(self) -> None:
        """Bring the local herd in step with the `nodes` table: add, update and remove nodes.

        Keeps each node's local counters (requests, tokens, fees this run); `busy` stays this router's own.
        """
        rows = await self._db().fetch(f"SELECT *, {_DB_NOW} AS now FROM nodes")
        seen = set()
        mono = time.monotonic()
        for row in rows:
            seen.add(row["id"])
            node = self.herd.nodes.get(row["id"])
            if node is None:
                node = HerdNode(
                    id=row["id"], url=row["url"], name=row["name"], models=list(row["models"]), slots=row["slots"]
                )
                self.herd.adopt(node)
            node.url, node.name, node.models, node.slots = row["url"], row["name"], list(row["models"]), row["slots"]
            node.static, node.draining, node.up = row["static"], row["draining"], row["up"]
            node.last_seen = row["last_seen"]
            rest = row["resting_until"] - row["now"]
            node.resting_until = mono + rest if rest > 0 else 0.0
        for node_id in [n for n in self.herd.nodes if n not in seen]:
            self.herd.remove(node_id)

    async def _reloader(self) -> None:
        while True:
            await self._reload_due.wait()
            self._reload_due.clear()
            try:
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cluster: reloading the herd failed")

    async def joined(self, node: HerdNode, *, static: bool = False) -> None:
        """Write a node that joined (or a `--node` of this router, `static`) into the herd for every router."""
        async with self._db().acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM nodes WHERE url = $1 AND id <> $2", node.url, node.id)
            if static:
                await conn.execute(
                    "INSERT INTO nodes (id, url, name, models, slots, static, up, last_seen) "
                    "VALUES ($1, $2, $3, $4, $5, true, false, $6) ON CONFLICT (id) DO NOTHING",
                    node.id, node.url, node.name, node.models, node.slots, time.time(),
                )  # fmt: skip
            else:
                await conn.execute(
                    "INSERT INTO nodes (id, url, name, models, slots, last_seen) VALUES ($1, $2, $3, $4, $5, $6) "
                    "ON CONFLICT (id) DO UPDATE SET url = $2, name = $3, models = $4, slots = $5, up = true, "
                    "resting_until = 0, last_seen = $6",
                    node.id, node.url, node.name, node.models, node.slots, time.time(),
                )  # fmt: skip
            await self._announce(conn)
        await self.dispatch()

    async def draining(self, node: HerdNode, draining: bool) -> None:
        """Drain (or undrain) a node at every router."""
        async with self._db().acquire() as conn, conn.transaction():
            await conn.execute("UPDATE nodes SET draining = $2 WHERE id = $1", node.id, draining)
            await self._announce(conn)
        if not draining:
            await self.dispatch()

    async def removed(self, node: HerdNode) -> None:
        """Take a node out of the herd at every router."""
        async with self._db().acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM nodes WHERE id = $1", node.id)
            await self._announce(conn)

    def pump(self) -> None:
        """Nothing: the leader's `checked` writes the node up, and that dispatches the herd's queue."""

    def failed(self, node: HerdNode) -> None:
        """A request here could not use `node` (down, or hung and resting): mark it so for every router."""
        rest = max(0.0, node.resting_until - time.monotonic())
        self._spawn(self._node_down(node.id, rest))

    async def _node_down(self, node_id: str, rest: float) -> None:
        async with self._db().acquire() as conn, conn.transaction():
            await conn.execute(
                f"UPDATE nodes SET up = false, resting_until = GREATEST(resting_until, {_DB_NOW} + $2) WHERE id = $1",
                node_id,
                rest,
            )
            await self._announce(conn)

    async def checked(self, before: dict[str, bool]) -> None:
        """The leader's health round ended: write what changed (`before`: each node's `up` before the round)."""
        changed = [n for n in self.herd.nodes.values() if before.get(n.id) is not None and before[n.id] != n.up]
        seen = [n for n in self.herd.nodes.values() if n.up]
        async with self._db().acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE nodes SET up = u.up, models = CASE WHEN u.up THEN u.models::text[] ELSE nodes.models END, "
                "slots = CASE WHEN u.up THEN u.slots ELSE nodes.slots END, name = u.name, last_seen = u.seen "
                "FROM (SELECT * FROM unnest($1::text[], $2::bool[], $3::text[], $4::int[], $5::text[], "
                "$6::float8[])) AS u(id, up, models, slots, name, seen) WHERE nodes.id = u.id",
                [n.id for n in seen + changed],
                [n.up for n in seen + changed],
                [_array_literal(n.models) for n in seen + changed],
                [n.slots for n in seen + changed],
                [n.name for n in seen + changed],
                [n.last_seen for n in seen + changed],
            )
            if changed:
                await self._announce(conn)
        if any(n.up for n in changed):
            await self.dispatch()

    async def try_lead(self) -> bool:
        """Become the router that runs the health checks, if none is (a session advisory lock on the listener
        connection: it is let go when this router's connection ends)."""
        if self._listener is None or self._listener.is_closed():
            log.warning("the connection that listens for the cluster's notifications was lost; reconnecting")
            try:
                await self._listen()
            except RouterIdInUse:
                # The database still holds the lost connection's lock on this router's id (it has not seen the
                # connection die yet): try again next round; meanwhile the rest of the round still runs.
                log.warning("this router's id is still locked by its lost connection; retrying")
                return False
        if not self.leader and self._listener is not None:
            self.leader = bool(await self._listener.fetchval("SELECT pg_try_advisory_lock($1)", self._leader_key))
            if self.leader:
                log.info("this router now runs the herd's health checks")
        return self.leader

    async def came_back(self, node: HerdNode) -> None:
        """A node's heartbeat brought it back: up for every router."""
        async with self._db().acquire() as conn, conn.transaction():
            await conn.execute("UPDATE nodes SET up = true, last_seen = $2 WHERE id = $1", node.id, node.last_seen)
            await self._announce(conn)
        await self.dispatch()

    async def _announce(self, conn: asyncpg.Connection) -> None:
        await conn.execute("SELECT pg_notify($1, 'herd')", self._channel)

    # -- the shared queue ------------------------------------------------------------------------------

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
        """A node with a slot reserved for request `request_id` in the whole herd; give it back with `release`.

        `arrived` is `time.monotonic()` at the router; it is stored as epoch seconds so that routers compare
        arrivals. Raises 503 when no node can serve the model, 429 when the model's queue (herd-wide) is full or
        `account` holds its share of it, 504 after `max_wait` seconds.
        """
        self.take_now(request_id, model, bid, exclude=exclude, prefer=prefer)
        pending = self._releasing.get(request_id)
        if pending is not None:  # the row of its last attempt must be gone before it queues again
            await asyncio.shield(pending)
        waiter = _Waiter(model, exclude)
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
                raise
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
            self._releasing[request_id] = self._spawn(self._give_back(request_id))
            raise
        self._waiting.pop(request_id, None)
        try:
            node = await self._node(node_id)
        except BaseException:
            self._releasing[request_id] = self._spawn(self._give_back(request_id))
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

    def release(self, request_id: str, node: HerdNode) -> None:
        """The request is done with its node: its row goes, and the slot goes to the best waiting request."""
        node.busy -= 1
        self._releasing[request_id] = self._spawn(self._give_back(request_id))

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
            self._releasing.pop(request_id, None)

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
        if rows:
            self.last_multiplier = rows[-1]["assigned_bid"]
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

    # -- figures ---------------------------------------------------------------------------------------

    def queue_length(self, model: str) -> int:
        """This router's requests waiting for `model` (the herd's: `queue_depths`)."""
        return sum(1 for w in self._waiting.values() if w.model == model and not w.future.done())

    async def queue_depths(self) -> dict[str, int]:
        """Requests waiting for a node, per model, herd-wide (every router's)."""
        rows = await self._db().fetch("SELECT model, count(*) AS n FROM queue WHERE node_id IS NULL GROUP BY model")
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
            f"SELECT model, count(*) FILTER (WHERE node_id IS NULL) AS depth, "
            f"COALESCE(max({_DB_NOW} - enqueued) FILTER (WHERE node_id IS NULL), 0) AS oldest, "
            "count(*) FILTER (WHERE node_id IS NOT NULL) AS running FROM queue GROUP BY model"
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


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """See `Cluster.open`."""


def _array_literal(items: Sequence[str]) -> str:
    """A PostgreSQL text[] literal (unnest cannot take an array of arrays of different lengths)."""
    return "{" + ",".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in items) + "}"


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("cluster background task failed: %r", task.exception())


# What a lost connection raises, as asyncpg reports it: InternalClientError too ("cannot switch to state …"),
# when a connection is cut in the middle of an operation.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)


class ClusterIdempotency(Idempotency):
    """Idempotency claims in the database: a repeat at any router waits for the first, wherever it runs.

    The answer is remembered in the ledger with the charge (as for one router); the claim (account, key,
    router) says that the first request is running. A repeat polls every `CLAIM_POLL_SECONDS` for the
    remembered answer or the claim's end; the claims of a router whose lease ran out are dropped by the janitor.
    """

    def __init__(self, ledger: Ledger, cluster: Cluster) -> None:
        super().__init__(ledger)
        self.cluster = cluster

    async def claim(self, account_id: int, key: str, print_: str) -> Claim | Remembered:
        """As Idempotency.claim; a repeat polls (every CLAIM_POLL_SECONDS, slowing to a second) for at most
        CLAIM_WAIT_SECONDS, then gets 409 `idempotency_key_in_use`: a client that left does not poll forever."""
        pool = self.cluster._db()
        deadline = time.monotonic() + CLAIM_WAIT_SECONDS
        pause = CLAIM_POLL_SECONDS
        while True:
            remembered = await self.ledger.recall(account_id, key)
            if remembered is not None:
                self._check(remembered.fingerprint, print_)
                return remembered
            # A claim only while no answer is remembered, in one statement: the first request remembers its answer
            # and then gives up its claim, and a repeat that looked for the answer just before could otherwise
            # claim the key just after, and run (and be charged) again.
            row = await pool.fetchrow(
                "WITH mine AS (INSERT INTO idempotency_claims (account_id, key, fingerprint, router_id) "
                "SELECT $1, $2, $3, $4 WHERE NOT EXISTS "
                "(SELECT 1 FROM idempotency WHERE account_id = $1 AND key = $2) "
                "ON CONFLICT DO NOTHING RETURNING fingerprint, true AS ours) "
                "SELECT fingerprint, ours FROM mine UNION ALL "
                "SELECT fingerprint, false FROM idempotency_claims WHERE account_id = $1 AND key = $2",
                account_id, key, print_, self.cluster.id,
            )  # fmt: skip
            if row is not None and row["ours"]:
                return Claim(account_id, key, print_)
            if row is not None:
                self._check(row["fingerprint"], print_)
            if time.monotonic() + pause > deadline:
                raise KeyInUse(
                    f"a request with this Idempotency-Key has been running for {CLAIM_WAIT_SECONDS:.0f} s; "
                    "retry later to get its answer"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 1.0)

    def release(self, claim: Claim) -> None:
        cluster = self.cluster
        cluster._spawn(
            cluster._until_done(
                f"ending the claim of idempotency key {claim.key!r}",
                lambda: cluster._db().execute(
                    "DELETE FROM idempotency_claims WHERE account_id = $1 AND key = $2 AND router_id = $3",
                    claim.account_id,
                    claim.key,
                    cluster.id,
                ),
            )
        )
