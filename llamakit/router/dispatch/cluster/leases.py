"""This router's place among the routers: its lease (renewed by a background task, on the database's clock),
its start and stop, the clean-up after routers whose lease ran out (their queue rows, claims and holds), and
who leads the herd's health checks."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from contextlib import suppress
from urllib.parse import parse_qs, urlsplit

import asyncpg

from llamakit.router.dispatch.cluster._base import (
    _DB_ERRORS,
    _DB_NOW,
    _FAST_COMMITS,
    SYNC_SECONDS,
    ClusterBase,
    RouterIdInUse,
    _no_reset,
    log,
)

__all__ = ["Leases"]


class Leases(ClusterBase):
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
        # No floor of connections, as the ledger's pool (see PostgresLedger.open): no traceback per reconnection try.
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
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
            error="the router that held this request stopped before it finished",
        )
        if released:
            routers = await self._db().fetch(
                "SELECT DISTINCT coalesce(router_id, '(no router)') AS id FROM holds WHERE id = ANY($1::text[]) "
                "ORDER BY 1",
                [record.request_id for record in released],
            )
            log.warning(
                "released %d hold(s) of router(s) %s, which stopped or lost their lease: charged what their streams "
                "had delivered by their last checkpoint, the rest refunded",
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

    async def try_lead(self) -> bool:
        """Become the router that runs the health checks, if none is (a session advisory lock on the listener
        connection: it is let go when this router's connection ends)."""
        if self._listener is None or self._listener.is_closed():
            if not self._relistening:  # said once, not at every round until it is back
                log.warning("the connection that listens for the cluster's notifications was lost; reconnecting")
            self._relistening = True
            try:
                await self._listen()
            except RouterIdInUse:
                # The database still holds the lost connection's lock on this router's id (it has not seen the
                # connection die yet): try again next round; meanwhile the rest of the round still runs.
                log.debug("this router's id is still locked by its lost connection; retrying")
                return False
            log.info("the connection that listens for the cluster's notifications is back")
            self._relistening = False
        if not self.leader and self._listener is not None:
            self.leader = bool(await self._listener.fetchval("SELECT pg_try_advisory_lock($1)", self._leader_key))
            if self.leader:
                log.info("this router now runs the herd's health checks")
        return self.leader
