"""The herd's membership in the database: nodes that join, drain, leave, fail or come back, written for every
router, and the local herd kept in step with the `nodes` table."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from llamakit.router.dispatch.cluster._base import (
    _DB_ERRORS,
    _DB_NOW,
    ClusterBase,
    _array_literal,
    log,
)
from llamakit.router.herd import HerdNode

__all__ = ["Membership"]


class Membership(ClusterBase):
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
            except _DB_ERRORS as exc:
                self._database_failed(exc)
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

    async def came_back(self, node: HerdNode) -> None:
        """A node's heartbeat brought it back: up for every router."""
        async with self._db().acquire() as conn, conn.transaction():
            await conn.execute("UPDATE nodes SET up = true, last_seen = $2 WHERE id = $1", node.id, node.last_seen)
            await self._announce(conn)
        await self.dispatch()

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

    async def _announce(self, conn: asyncpg.Connection) -> None:
        await conn.execute("SELECT pg_notify($1, 'herd')", self._channel)
