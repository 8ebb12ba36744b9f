"""Ledgers on both backends for the contract suite: a SQLite file per test, a fresh PostgreSQL schema per test.

PostgreSQL tests need `LLAMAKIT_TEST_POSTGRES` (a URL such as postgresql://llamakit:llamakit@127.0.0.1:5432/
llamakit_test; `.ci/run` starts the server and sets it) and are skipped, with that reason, where it is unset.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from llamakit.router.ledger import Ledger, backend_of, ledger_at, sqlite_path

POSTGRES = os.environ.get("LLAMAKIT_TEST_POSTGRES")
NO_POSTGRES = "LLAMAKIT_TEST_POSTGRES is not set (a postgresql:// URL of a database the tests may create schemas in)"
BACKENDS = ["sqlite", "postgres"]


def with_schema(url: str, schema: str) -> str:
    """`url` with its search_path set to `schema` (asyncpg passes unknown query parameters as server settings)."""
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


@asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A URL whose ledger lives in a new, empty schema, dropped afterwards."""
    import asyncpg

    if not POSTGRES:
        pytest.skip(NO_POSTGRES)
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(POSTGRES)
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        yield with_schema(POSTGRES, schema)
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()


@asynccontextmanager
async def backend_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield str(tmp_path / "ledger.db")
    else:
        async with postgres_schema() as url:
            yield url


@pytest.fixture(params=BACKENDS)
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Where a test's ledger lives: a SQLite file or a PostgreSQL schema of its own."""
    async with backend_url(request.param, tmp_path) as where:
        yield where


@pytest.fixture
async def ledger(url: str) -> AsyncIterator[Ledger]:
    async with ledger_at(url) as opened:
        yield opened


async def execute(url: str, sql: str) -> None:
    """Run `sql` on the ledger's database behind its back (to make a state the ledger itself never would)."""
    if backend_of(url) == "sqlite":
        with sqlite3.connect(sqlite_path(url)) as conn:
            conn.execute(sql)
        return
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def stored_bytes(url: str) -> bytes:
    """Everything the database holds for the ledger, as bytes: the SQLite files, or every row as text."""
    if backend_of(url) == "sqlite":
        path = Path(sqlite_path(url))
        return b"".join(p.read_bytes() for p in path.parent.iterdir() if p.name.startswith(path.name))
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        rows = [await conn.fetch(f'SELECT t::text AS row FROM "{t["tablename"]}" t') for t in tables]
    finally:
        await conn.close()
    return "\n".join(r["row"] for table in rows for r in table).encode()


async def undo_delivery_checkpoints(url: str) -> None:
    """Take the ledger's schema back to before version 14 (delivery checkpoints on holds), and so before 16 (their
    cached tokens) too; the caller sets the version it then claims to be at."""
    for column in ("prompt_tokens", "completion_tokens", "charge", "model", "node", "at", "cached_tokens",
                   "cache_discount"):  # fmt: skip
        await execute(url, f"ALTER TABLE holds DROP COLUMN delivered_{column}")


async def undo_running_totals(url: str) -> None:
    """Take the ledger's schema back to before version 13 (running totals), as an older llamakit left it, and so
    before the versions after it too (15's batches); the caller sets the version it then claims to be at."""
    statements = [
        *(f"DROP TABLE {t}" for t in ("batch_lines", "batches", "files")),
        *(f"DROP TABLE {t}" for t in ("account_periods", "ledger_periods", "node_fees", "ledger_totals",
                                       "archived_accounts", "archived_nodes")),
        "DROP INDEX api_keys_limited",
        "DROP INDEX idempotency_request",
        *(f"ALTER TABLE accounts DROP COLUMN {c}" for c in ("held", "spent", "deposited", "last_seen")),
    ]  # fmt: skip
    if backend_of(url) == "postgres":
        statements += [
            "DROP FUNCTION llamakit_day",
            "DROP FUNCTION llamakit_month",
            "DROP FUNCTION llamakit_count_usage",
            "DROP FUNCTION llamakit_count_period",
        ]
    for statement in statements:
        await execute(url, statement)
