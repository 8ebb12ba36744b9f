"""Versioned schema migrations: numbered SQL files, `migrations/<backend>/NNNN_what.sql`, applied in order.

Each backend keeps the version it is at: SQLite in `PRAGMA user_version` (as the ledgers made before this
runner did, so they upgrade in place), PostgreSQL in the one-row table `llamakit_schema`. Every pending
file runs in one transaction with the version bump, under a lock that makes routers starting together
on one database wait for each other: SQLite's write lock (BEGIN IMMEDIATE), PostgreSQL's advisory lock.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Final, Literal

from llamakit.router.ledger._contract import LedgerError

if TYPE_CHECKING:
    import asyncpg

__all__ = ["Migration", "latest", "migrate_postgres", "migrate_sqlite", "migrations"]

Backend = Literal["sqlite", "postgres"]
# pg_advisory_xact_lock key: "llamakit" in ASCII, so it does not collide with another application's lock.
ADVISORY_LOCK: Final = 0x6C6C616D616B6974


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@cache
def migrations(backend: Backend) -> tuple[Migration, ...]:
    """The backend's migrations by version, numbered 1, 2, … without gaps."""
    folder = resources.files("llamakit.router.ledger").joinpath("migrations", backend)
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"the {backend} migrations are not numbered 1..n: {[m.version for m in found]}")
    return tuple(found)


def latest(backend: Backend) -> int:
    """The schema version this llamakit brings a ledger to."""
    return len(migrations(backend))


def _too_new(version: int, backend: Backend) -> LedgerError:
    return LedgerError(
        f"the ledger has schema version {version}, newer than this llamakit understands "
        f"({latest(backend)}); upgrade llamakit"
    )


def _statements(sql: str) -> list[str]:
    """A script cut into statements (sqlite3 runs one per call; executescript would commit on its own)."""
    statements, pending = [], ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip() and not all(line.lstrip().startswith("--") for line in pending.strip().splitlines()):
        raise RuntimeError(f"unterminated SQL statement in a migration: {pending.strip()[:80]!r}")
    return statements


def migrate_sqlite(conn: sqlite3.Connection) -> int:
    """Bring a SQLite ledger (autocommit connection) to the latest version; returns the version it was at."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > latest("sqlite"):
            raise _too_new(version, "sqlite")
        for migration in migrations("sqlite")[version:]:
            for statement in _statements(migration.sql):
                conn.execute(statement)
        if version != latest("sqlite"):
            conn.execute(f"PRAGMA user_version = {latest('sqlite')}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return version


async def migrate_postgres(conn: asyncpg.Connection) -> int:
    """Bring a PostgreSQL ledger (the connection's current schema) to the latest version; returns the old one."""
    async with conn.transaction():
        # Held until this transaction ends: a second router starting now waits here, then finds nothing to do.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS llamakit_schema (version integer NOT NULL)")
        version = await conn.fetchval("SELECT version FROM llamakit_schema")
        if version is None:
            version = 0
            await conn.execute("INSERT INTO llamakit_schema (version) VALUES (0)")
        if version > latest("postgres"):
            raise _too_new(version, "postgres")
        for migration in migrations("postgres")[version:]:
            await conn.execute(migration.sql)
        if version != latest("postgres"):
            await conn.execute("UPDATE llamakit_schema SET version = $1", latest("postgres"))
    return int(version)
