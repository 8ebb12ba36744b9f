"""Versioned migrations: ledgers made by earlier llamakit upgrade in place; routers starting together migrate once."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from llamakit.money.currency import CreditValue
from llamakit.router.ledger import AccountState, Remembered, backend_of, latest, ledger_at
from llamakit.router.ledger._migrations import migrations

FIXTURES = Path(__file__).parent / "fixtures"
# The key the fixtures were made with (they store only its SHA-256, as every ledger does).
FIXTURE_KEY = "lk-fixture-key-of-alice-0123456789abcdefghijklmn"


def old_ledger(path: Path, version: int) -> Path:
    """A ledger file as llamakit's single-file ledger.py made it at schema `version` (see fixtures/)."""
    with sqlite3.connect(path) as conn:
        conn.executescript((FIXTURES / f"ledger_v{version}.sql").read_text())
        conn.execute(f"PRAGMA user_version = {version}")
    conn.close()
    return path


def schema_of(path: Path) -> set[str]:
    """Every table and index of a SQLite file, as the SQL that makes it, with whitespace normalised."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall()
    conn.close()
    return {" ".join(sql.split()) for (sql,) in rows}


@pytest.mark.parametrize("version", [1, 2, 6, 8, 9, 11, 12, 13, 14, 15])
async def test_an_existing_sqlite_ledger_upgrades_in_place(tmp_path: Path, version: int) -> None:
    path = old_ledger(tmp_path / "ledger.db", version)
    async with ledger_at(path, money=CreditValue(Decimal("0.0025"), "EUR")) as ledger:
        alice = await ledger.account_by_name("alice")
        bot = await ledger.account_by_name("bot")
        assert await ledger.authenticate(FIXTURE_KEY) == alice
        assert await ledger.account_state(alice.id) == AccountState(balance=880, held=0, spent=120, deposited=1000)
        assert await ledger.account_state(bot.id) == AccountState(balance=300, held=200, spent=0, deposited=500)
        assert (await ledger.books()).balanced
        # Version 13's running totals are what the history held.
        assert await ledger.fees_by_node() == {"node-a": 120}
        assert (await ledger.totals()).requests == 2 and (await ledger.audit()).ok  # a settlement, a release
        settled = await ledger.find_usage("req-settled")
        assert settled is not None and (settled.cost, settled.bid, settled.node) == (120, "1.5", "node-a")
        # Made before records kept their price: priced at the value the router runs with.
        assert (settled.credit_value, settled.currency) == (None, None)
        assert (await ledger.event_summary())["bot"]["position"] == 1
        # The hold the old router left open is released like any other.
        assert [r.request_id for r in await ledger.recover_usage()] == ["req-open"]
        if version == 2:
            assert await ledger.recall(alice.id, "key-1") == Remembered("key-1", "fp-1", '{"body": {}, "headers": {}}')
        # What version 2 added works on a ledger that had no version 2.
        await ledger.hold(alice.id, 50, request_id="req-new", model="smol")
        await ledger.settle(
            "req-new", charge=5, node="n", prompt_tokens=1, completion_tokens=1, remember=Remembered("k", "f", "{}")
        )
        assert await ledger.recall(alice.id, "k") == Remembered("k", "f", "{}")
        new = await ledger.find_usage("req-new")
        assert new is not None and (new.credit_value, new.currency) == ("0.0025", "EUR")
        assert (await ledger.books()).balanced
        audit = await ledger.audit()
        assert audit.ok, audit.discrepancies
        # A key made before version 8 has no name, and can be given one.
        assert [k.name for k in await ledger.list_keys(alice.id)] == [None]
        assert (await ledger.rename_key(FIXTURE_KEY, "alice's laptop")).name == "alice's laptop"
        assert (await ledger.find_key(FIXTURE_KEY[:8])).name == "alice's laptop"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == latest("sqlite")
    conn.close()
    async with ledger_at(tmp_path / "fresh.db"):
        pass
    assert schema_of(path) == schema_of(tmp_path / "fresh.db")


async def test_opening_an_up_to_date_ledger_changes_nothing(tmp_path: Path) -> None:
    path = old_ledger(tmp_path / "ledger.db", latest("sqlite"))
    before = dump(path)
    async with ledger_at(path):
        pass
    assert dump(path) == before


def dump(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        lines = [*conn.iterdump(), f"user_version {conn.execute('PRAGMA user_version').fetchone()[0]}"]
    conn.close()
    return lines


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    for backend in ("sqlite", "postgres"):
        found = migrations(backend)  # type: ignore[arg-type]
        assert [m.version for m in found] == list(range(1, len(found) + 1)) and found
        assert latest(backend) == len(found)  # type: ignore[arg-type]
    # The two backends keep the same tables at the same versions; PostgreSQL adds the batch function.
    assert [m.name for m in migrations("sqlite")] == [m.name for m in migrations("postgres")][: latest("sqlite")]


async def test_routers_starting_together_migrate_once(url: str) -> None:
    ledgers = [ledger_at(url) for _ in range(6)]
    await asyncio.gather(*(ledger.open() for ledger in ledgers))
    try:
        alice = await ledgers[0].create_account("alice")
        await ledgers[1].deposit(alice.id, 600)
        for i, ledger in enumerate(ledgers):
            await ledger.hold(alice.id, 100, request_id=f"r{i}", model="smol")
        assert await ledgers[-1].account_state(alice.id) == AccountState(balance=0, held=600, spent=0, deposited=600)
    finally:
        await asyncio.gather(*(ledger.close() for ledger in ledgers))
    if backend_of(url) == "postgres":
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetch("SELECT version FROM llamakit_schema") == [(latest("postgres"),)]
        finally:
            await conn.close()
