"""One router per ledger, unless they are a cluster: a SQLite file is locked (flock) for as long as a router
has it open, and a PostgreSQL ledger by an advisory lock (see claim_postgres_ledger).

A router's start releases every hold it finds open, since in SQLite they can only be its own, left by a run
that did not finish. A second router on the same file would release the first one's holds while their
requests run, and give their tokens away (found by a new user: a second `llamakit up` whose router restarted
in a loop, each start recovering the live router's holds). Several routers share a ledger only in
PostgreSQL, with `--cluster yes`, where each has a lease and releases only the holds of routers without one.

flock, not SQLite's own locks: those are fcntl locks on byte ranges, per process, which flock does not
touch on Linux; the kernel drops a flock with the last descriptor of its file, so a killed router leaves
none behind.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any
from urllib.parse import unquote, urlsplit

from llamakit.router.ledger._contract import LedgerError

__all__ = ["LedgerTaken", "PostgresOwner", "claim_postgres_ledger", "claim_sqlite_ledger", "own_ledger"]

log = logging.getLogger(__name__)


class LedgerTaken(LedgerError):
    """Another router has the ledger (its kind is not this one's, or neither is a cluster)."""


async def own_ledger(
    db: str | os.PathLike[str], *, cluster: bool, on_lost: Callable[[], None]
) -> Callable[[], Awaitable[None]]:
    """Take the ledger `db` names for this router, before it opens it: a SQLite file for itself, a PostgreSQL
    ledger as a cluster's router or alone (see PostgresOwner, which calls `on_lost` if the lock is lost to
    another router). Returns what lets go of it. LedgerTaken when another router has it, LedgerError when it
    cannot be reached."""
    from llamakit.router.ledger import backend_of, redacted, sqlite_path

    if backend_of(db) == "sqlite":
        fd = claim_sqlite_ledger(sqlite_path(db))

        async def release_file() -> None:
            if fd is not None:
                os.close(fd)

        return release_file
    owner = PostgresOwner(os.fspath(db), redacted(db), cluster=cluster, on_lost=on_lost)
    await owner.claim()
    return owner.close


def claim_sqlite_ledger(path: str) -> int | None:
    """Lock the SQLite ledger at `path` for this router; the lock's descriptor, to close when the router stops
    (None for an in-memory ledger). LedgerError when another router has it."""
    file = _file_of(path)
    if file is None:
        return None
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CREAT, 0o600)
    except OSError as exc:  # as SQLite would say it: a directory that does not exist, no permission
        raise LedgerError(f"cannot open the ledger at {file}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LedgerTaken(
            f"another router is running on the ledger {file}: a SQLite ledger has one router (its start releases "
            "the holds it finds open). Stop that one, or run several routers on PostgreSQL: "
            "--db postgresql://… --cluster yes"
        ) from None
    return fd


def _file_of(path: str) -> str | None:
    """The file SQLite opens for `path`: itself, or the file a `file:` URI names (SQLite reads URIs here);
    None for an in-memory database."""
    if path.startswith("file:"):
        uri = urlsplit(path)
        if uri.path in ("", ":memory:") or "mode=memory" in uri.query:
            return None
        return unquote(uri.path)
    return None if path == ":memory:" else path


async def claim_postgres_ledger(dsn: str, display: str, *, cluster: bool) -> Any:
    """The same for a PostgreSQL ledger, where several routers may share it only with `--cluster yes`: a
    session advisory lock, shared by the routers of a cluster and exclusive for a router without one, held on
    a connection of its own (returned, to close when the router stops; the database drops the lock with it).
    LedgerError when a router of the other kind, or another router without a cluster, has the ledger."""
    import asyncpg  # only where PostgreSQL is used

    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        raise LedgerError(f"cannot open the ledger at {display}: {exc}") from exc
    try:
        where = await conn.fetchval("SELECT current_database() || '.' || current_schema()")
        # Advisory locks are per database, not per schema: the key is named after both.
        key = int.from_bytes(hashlib.sha256(f"{where}\0owner".encode()).digest()[:8], "big", signed=True)
        take = "pg_try_advisory_lock_shared" if cluster else "pg_try_advisory_lock"
        if not await conn.fetchval(f"SELECT {take}($1)", key):
            if cluster:
                raise LedgerTaken(
                    f"a router without --cluster is running on the ledger {display}; it releases every hold it "
                    "finds open when it starts: stop it, or run it with --cluster yes as well"
                )
            raise LedgerTaken(
                f"another router is running on the ledger {display}: without --cluster a router has its ledger "
                "to itself (its start releases the holds it finds open); run every router with --cluster yes"
            )
    except BaseException:
        await conn.close()
        raise
    return conn


class PostgresOwner:
    """Keeps a router's hold on a PostgreSQL ledger (see claim_postgres_ledger) while the router runs.

    The lock lives as long as its connection. When the connection is lost (the database restarted, the
    connection was terminated), the owner takes the lock again on a new one, retrying while the database
    cannot be reached. If another router took it meanwhile, that router has released this one's open holds,
    and every request in flight here runs free: the owner logs so and `on_lost()` stops this router.
    """

    def __init__(self, dsn: str, display: str, *, cluster: bool, on_lost: Callable[[], None]) -> None:
        self._dsn, self._display, self._cluster, self._on_lost = dsn, display, cluster, on_lost
        self._conn: Any = None
        self._closing = False
        self._retaking: asyncio.Task[None] | None = None

    async def claim(self) -> None:
        """Take the lock; LedgerError when it is taken (see claim_postgres_ledger)."""
        self._conn = await claim_postgres_ledger(self._dsn, self._display, cluster=self._cluster)
        self._conn.add_termination_listener(self._lost)

    def _lost(self, conn: Any) -> None:
        if not self._closing and (self._retaking is None or self._retaking.done()):
            self._retaking = asyncio.get_running_loop().create_task(self._retake(), name="ledger owner lock")

    async def _retake(self, every: float = 0.5) -> None:
        log.warning("the connection holding this router's lock on the ledger %s was lost; taking it again",
                    self._display)  # fmt: skip
        failures = 0
        while not self._closing:
            try:
                await self.claim()
            except LedgerTaken as exc:
                log.critical("another router took the ledger %s while this router's lock was lost (%s); its start "
                             "released this router's open holds: stopping", self._display, exc)  # fmt: skip
                self._on_lost()
                return
            except Exception as exc:  # the database cannot be reached yet (its holds cannot move either), or the
                # new connection failed while it took the lock: again, every `every` seconds, said once
                failures += 1
                if failures == 1:
                    log.warning("taking the lock on the ledger %s again failed (%s); retrying every %g s until it "
                                "answers", self._display, exc, every)  # fmt: skip
                await asyncio.sleep(every)
                continue
            log.info("the lock on the ledger %s is this router's again (%d tries failed)", self._display, failures)
            return

    async def close(self) -> None:
        self._closing = True
        if self._retaking is not None:
            self._retaking.cancel()
            with suppress(asyncio.CancelledError):
                await self._retaking
        if self._conn is not None:
            with suppress(Exception):  # the database may be gone; it drops the lock with the connection anyway
                await self._conn.close()
